"""Shared logic of the command-line tools (``tools/train.py``,
``tools/test.py``, ``tools/demo.py``).

The tools work for every task by reading the config's ``default_scope``
(``mmpretrain``, ``mmdet`` or ``mmseg``); this module holds what they share:
config loading and overrides, the adaptations needed on a machine without
CUDA (fp32 instead of mixed precision, gloo instead of NCCL, BatchNorm
instead of SyncBN) and the ``--cfg-options`` that point a config at the
built-in demo data.
"""
from .demo import TASK_OF_SCOPE, builtin_data_options, save_initial_checkpoint
from .launch import (
                     adapt_to_host,
                     build_runner,
                     enable_visualization,
                     load_config,
                     setup_amp,
                     setup_resume,
                     setup_work_dir,
)

__all__ = [
    'TASK_OF_SCOPE', 'adapt_to_host', 'build_runner', 'builtin_data_options',
    'enable_visualization', 'load_config', 'save_initial_checkpoint',
    'setup_amp', 'setup_resume', 'setup_work_dir'
]
