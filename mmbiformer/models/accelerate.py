"""``accelerate(model)``: an opt-in, state-dict-preserving transform of the
BiFormer backbones inside a model.

The backbone is built from plain torch modules (``nn.Linear``,
``nn.LayerNorm``, ``DropPath``) so that users can hook, replace or quantise
them. This transform trades some of that for speed, in place, and only
inside :class:`~.biformer.BiFormer` backbones (a neck, a head or another
backbone in the same model is left alone):

* the linear layers and the GELU MLPs become
  :class:`~mmbiformer.ops.accelerate.AcceleratedLinear` and
  :class:`~mmbiformer.ops.accelerate.AcceleratedMlp` (registered products
  whose CPU registration runs them in oneDNN; other devices compute as
  before);
* every :class:`~.layers.BiFormerBlock` becomes a
  :class:`KeptSamplesBlock`: in training with stochastic depth, a residual
  branch runs only for the samples whose branch is kept, where
  ``DropPath`` computes it for the whole batch and multiplies the dropped
  samples by zero. Same result in distribution (each sample's branch is
  kept with probability ``1 - drop_prob`` and scaled by its inverse); the
  random draws differ from ``DropPath``'s.

Module classes change, parameters, buffers and parameter names do not, so
checkpoints saved from an accelerated model load into a plain one and back.
What each part saves is measured in ``docs/benchmarks.md``.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn

from ..ops.accelerate import swap_modules
from .biformer import BiFormer
from .layers import BiFormerBlock, DropPath

__all__ = ['KeptSamplesBlock', 'accelerate', 'residual_kept',
           'residual_plain']


def residual_plain(x: torch.Tensor, branch: Callable, inp: torch.Tensor,
                   drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(branch(inp))``, as the plain block computes it."""
    return x + drop_path(branch(inp))


def residual_kept(x: torch.Tensor, branch: Callable, inp: torch.Tensor,
                  drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(branch(inp))`` with the branch run only for the kept
    samples of a training ``DropPath``.

    Where every sample is dropped the branch still runs, on an empty batch,
    so that each parameter gets a (zero) gradient in every step, as
    distributed data parallel training expects. Under ``torch.compile`` it
    computes as :func:`residual_plain` (the kept count is data-dependent,
    a graph break).
    """
    if not (isinstance(drop_path, DropPath) and drop_path.training
            and drop_path.drop_prob > 0.) or torch.compiler.is_compiling():
        return x + drop_path(branch(inp))
    keep = 1. - drop_path.drop_prob
    kept = torch.rand(x.shape[0], device=x.device) < keep
    index = kept.nonzero().squeeze(1)
    return torch.index_add(x, 0, index, branch(inp[index]), alpha=1. / keep)


#: how a KeptSamplesBlock adds its branches (a module attribute, so that an
#: A/B in benchmarks/ can swap it for ``residual_plain``)
RESIDUAL: Callable = residual_kept


class KeptSamplesBlock(BiFormerBlock):
    """:class:`~.layers.BiFormerBlock` whose residual branches run only for
    the samples that stochastic depth keeps (:func:`residual_kept`); the
    same modules and parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = RESIDUAL(x, lambda t: self.attn(self.norm1(t)), x,
                     self.drop_path)
        x = RESIDUAL(x, lambda t: self.mlp(self.norm2(t)), x, self.drop_path)
        return x.permute(0, 3, 1, 2)


def accelerate(model: nn.Module) -> Dict[str, int]:
    """Accelerate, in place, every :class:`~.biformer.BiFormer` backbone
    inside ``model`` (``model`` itself may be one); see the module
    docstring. Returns how many modules were swapped, by kind:
    ``{'backbones': ..., 'modules': ..., 'blocks': ...}``. Applying it
    twice changes nothing more."""
    counts = {'backbones': 0, 'modules': 0, 'blocks': 0}
    for backbone in model.modules():
        if not isinstance(backbone, BiFormer):
            continue
        counts['backbones'] += 1
        counts['modules'] += swap_modules(backbone)
        for block in backbone.modules():
            if type(block) is BiFormerBlock:
                block.__class__ = KeptSamplesBlock
                counts['blocks'] += 1
    return counts
