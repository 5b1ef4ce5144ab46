"""``accelerate(model)``: an opt-in, state-dict-preserving transform of the
BiFormer backbones inside a model.

The backbone is built from plain torch modules (``nn.Linear``,
``nn.LayerNorm``, ``DropPath``) so that users can hook, replace or quantise
them. This transform trades some of that for speed, in place, and only
inside :class:`~.biformer.BiFormer` backbones (a neck, a head or another
backbone in the same model is left alone): the linear layers, the GELU
MLPs, the 5x5 depthwise convs (LePE) and the blocks become
:class:`~mmbiformer.ops.accelerate.AcceleratedLinear`,
:class:`~mmbiformer.ops.accelerate.AcceleratedMlp`,
:class:`~mmbiformer.ops.accelerate.AcceleratedDepthwiseConv` and
:class:`AcceleratedBlock`: registered operators whose CPU registration runs
oneDNN products and the GELU post-op in inference, a one-pass C++ weight
gradient of the convs in training, and at the AVX-512 level the MLP and the
residual add with ``norm2`` as one operator each in training, where each
was measured to pay (other devices compute as before).

Module classes change; parameters, buffers and parameter names do not, so
checkpoints saved from an accelerated model load into a plain one and back.
What each part saves is measured in ``docs/benchmarks.md``.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..ops.accelerate import add_norm, swap_modules, training_fusions
from .biformer import BiFormer
from .layers import BiFormerBlock, DropPath

__all__ = ['AcceleratedBlock', 'accelerate', 'block_forward']


def _sample_factors(drop_path: nn.Module,
                    x: torch.Tensor) -> Optional[torch.Tensor]:
    # per-sample factors (N,) of a training DropPath, else None
    if not (isinstance(drop_path, DropPath) and drop_path.training
            and drop_path.drop_prob > 0):
        return None
    return drop_path.sample_factors(x).view(-1)


class AcceleratedBlock(BiFormerBlock):
    """A :class:`~.layers.BiFormerBlock` whose training forward adds the
    attention branch to the residual stream and normalises the sum for the
    MLP in one operator (``mmbiformer::add_layer_norm``, one pass of the
    C++ kernel on the CPU, forward and backward), the branch's drop path
    folded into it::

        x = x + pos_embed(x)
        z, h = add_norm(x, attn(norm1(x)), norm2, drop_path factors)
        x = z + drop_path(mlp(h))

    The same function as the plain block (to float rounding); ``norm2``
    and the first ``drop_path`` call are not modules called then (hooks on
    them fire in inference only). Without gradients, and where
    :func:`~mmbiformer.ops.accelerate.training_fusions` says they do not
    pay (below AVX-512, other devices and dtypes), it is the plain
    block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x)


def block_forward(block: BiFormerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output as :class:`AcceleratedBlock` computes it."""
    norm = block.norm2
    if not (torch.is_grad_enabled() and training_fusions(x)
            and type(norm) is nn.LayerNorm
            and norm.elementwise_affine and norm.bias is not None
            and len(norm.normalized_shape) == 1):
        return BiFormerBlock.forward(block, x)
    if block.pos_embed is not None:
        x = x + block.pos_embed(x)
    x = x.permute(0, 2, 3, 1)
    factors = _sample_factors(block.drop_path, x)
    z, h = add_norm(x, block.attn(block.norm1(x)), norm, factors)
    x = z + block.drop_path(block.mlp(h))
    return x.permute(0, 3, 1, 2)


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
            for block in backbone.modules():
                if type(block) is BiFormerBlock:
                    block.__class__ = AcceleratedBlock
                    counts['modules'] += 1
    return counts
