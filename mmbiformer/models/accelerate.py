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
:class:`AcceleratedBlock`: registered operators whose CPU registration runs,
in inference, oneDNN products with the GELU as a post-op at the AVX-512
level and the MLP a block of rows at a time at AVX2, a one-pass C++ weight
gradient of the convs in training, and at the AVX-512 level the MLP and the
residual add with ``norm2`` as one operator each in training; in CPU
training the blocks run a partly dropped branch (drop path) for its kept
samples only. Each was measured to pay (other devices compute as
before).

Module classes change; parameters, buffers and parameter names do not, so
checkpoints saved from an accelerated model load into a plain one and back.
What each part saves is measured in ``docs/benchmarks.md``.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..ops.accelerate import (
    _autocast,
    _per_sample,
    add_norm,
    swap_modules,
    training_fusions,
)
from .biformer import BiFormer
from .layers import BiFormerBlock, DropPath

__all__ = ['AcceleratedBlock', 'accelerate', 'block_forward', 'kept_samples']


def _sample_factors(drop_path: nn.Module,
                    x: torch.Tensor) -> Optional[torch.Tensor]:
    # per-sample factors (N,) of a training DropPath, else None
    if not (isinstance(drop_path, DropPath) and drop_path.training
            and drop_path.drop_prob > 0):
        return None
    return drop_path.sample_factors(x).view(-1)


def kept_samples(factors: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The samples a branch's drop path keeps (factor > 0), where running
    the branch for them alone is what :class:`AcceleratedBlock` does: eager
    CPU code with some sample dropped. ``None``: run the branch for the
    whole batch (no drop path, every sample kept, another device, where the
    index of the kept samples would wait for it, or a graph being traced,
    where the batch would become data dependent)."""
    if factors is None or factors.device.type != 'cpu' or \
            torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    kept = factors.nonzero().view(-1)
    return None if kept.numel() == factors.shape[0] else kept


def _add_branch(x: torch.Tensor, branch, inp: torch.Tensor,
                drop_path: nn.Module, factors: Optional[torch.Tensor],
                kept: Optional[torch.Tensor]) -> torch.Tensor:
    # x + drop_path(branch(inp)) with the drop-path factors drawn already:
    # for the kept samples only where there are such (kept_samples)
    if kept is not None:
        return _add_kept(x, kept, branch, inp, drop_path)
    y = branch(inp)
    return x + (y if factors is None else y * _per_sample(factors, y.dim()))


def _add_kept(x: torch.Tensor, kept: torch.Tensor, branch,
              inp: torch.Tensor, drop_path: DropPath) -> torch.Tensor:
    # x + drop_path(branch(inp)) with the branch run for the kept samples
    # only: a dropped sample's branch adds zeros. With every sample dropped
    # the branch runs on an empty batch, so that its parameters still get
    # (zero) gradients, as distributed data parallel training expects.
    return torch.index_add(x, 0, kept, branch(inp.index_select(0, kept)),
                           alpha=1. / (1. - drop_path.drop_prob))


class AcceleratedBlock(BiFormerBlock):
    """A :class:`~.layers.BiFormerBlock` for CPU training, the same
    function as the plain block (to float rounding, with the same random
    draws):

    * a branch whose drop path drops some samples runs for the kept
      samples only (:func:`kept_samples`) and is added to theirs with
      ``torch.index_add``: a dropped sample's branch would add zeros, and
      BiFormer's branches compute each sample on its own. BiFormer-S's
      drop-path rates rise to 0.15, so about 7.5 % of the branches' work
      goes, in expectation;
    * where :func:`~mmbiformer.ops.accelerate.training_fusions` says it
      pays (float32 at the AVX-512 level), the attention branch's residual
      add and ``norm2`` of the sum are one operator
      (``mmbiformer::add_layer_norm``), the branch's drop-path factors
      folded into it::

          x = x + pos_embed(x)
          z, h = add_norm(x, attn(norm1(x)), norm2, drop_path factors)
          x = z + drop_path(mlp(h))

    ``drop_path`` and, with the fused operator, ``norm2`` are not the
    modules called then (hooks on them fire in inference only). Without
    gradients, on other devices and under autocast, it is the plain
    block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x)


def _fused_norm(block: BiFormerBlock, x: torch.Tensor) -> bool:
    norm = block.norm2
    return (training_fusions(x) and type(norm) is nn.LayerNorm
            and norm.elementwise_affine and norm.bias is not None
            and len(norm.normalized_shape) == 1)


def block_forward(block: BiFormerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's output as :class:`AcceleratedBlock` computes it."""
    if not (torch.is_grad_enabled() and x.device.type == 'cpu') or \
            _autocast(x):
        return BiFormerBlock.forward(block, x)
    if block.pos_embed is not None:
        x = x + block.pos_embed(x)
    x = x.permute(0, 2, 3, 1)

    def attn(t):
        return block.attn(block.norm1(t))

    factors = _sample_factors(block.drop_path, x)
    kept = kept_samples(factors)
    if kept is None and _fused_norm(block, x):
        x, h = add_norm(x, attn(x), block.norm2, factors)
    else:
        x = _add_branch(x, attn, x, block.drop_path, factors, kept)
        h = block.norm2(x)
    factors = _sample_factors(block.drop_path, x)
    return _add_branch(x, block.mlp, h, block.drop_path, factors,
                       kept_samples(factors)).permute(0, 3, 1, 2)


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
