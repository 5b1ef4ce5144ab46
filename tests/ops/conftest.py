"""Run the Triton kernels under Triton's interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when ``triton`` is first imported, so it is set
here, before any test module of this folder is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
