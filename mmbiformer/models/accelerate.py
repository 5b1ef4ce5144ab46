"""``accelerate(model)``: an opt-in, state-dict-preserving transform of the
BiFormer backbones inside a model.

The backbone is built from plain torch modules (``nn.Linear``,
``nn.LayerNorm``, ``DropPath``) so that users can hook, replace or quantise
them. This transform trades some of that for speed, in place, and only
inside :class:`~.biformer.BiFormer` backbones (a neck, a head or another
backbone in the same model is left alone): the linear layers, the GELU
MLPs and the 5x5 depthwise convs (LePE) become
:class:`~mmbiformer.ops.accelerate.AcceleratedLinear`,
:class:`~mmbiformer.ops.accelerate.AcceleratedMlp` and
:class:`~mmbiformer.ops.accelerate.AcceleratedDepthwiseConv`: registered
operators whose CPU registration runs oneDNN products and the GELU post-op
in inference and a one-pass C++ weight gradient of the convs in training,
where each was measured to pay (other devices compute as before).

Module classes change; parameters, buffers and parameter names do not, so
checkpoints saved from an accelerated model load into a plain one and back.
What each part saves is measured in ``docs/benchmarks.md``.
"""
from typing import Dict

import torch.nn as nn

from ..ops.accelerate import swap_modules
from .biformer import BiFormer

__all__ = ['accelerate']


def accelerate(model: nn.Module) -> Dict[str, int]:
    """Accelerate, in place, every :class:`~.biformer.BiFormer` backbone
    inside ``model`` (``model`` itself may be one); see the module
    docstring. Returns ``{'backbones': ..., 'modules': ...}``, how many
    backbones were found and modules swapped. Applying it twice changes
    nothing more."""
    counts = {'backbones': 0, 'modules': 0}
    for backbone in model.modules():
        if isinstance(backbone, BiFormer):
            counts['backbones'] += 1
            counts['modules'] += swap_modules(backbone)
    return counts
