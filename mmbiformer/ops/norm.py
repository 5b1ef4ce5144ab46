"""``add_norm``: a residual add and the LayerNorm that reads its sum, as one
op in CPU training.

A BiFormer block adds its attention branch to the residual stream and
normalises the sum for the MLP (``z = x + drop_path(y)``, ``norm2(z)``).
As separate ops the forward writes ``z`` and reads it back for the norm,
and the backward writes the norm's input gradient, adds it to the
gradient ``z`` receives from the rest of the block, and scales a copy of
the sum for the dropped-path branch: five passes over the map. In float32
CPU training with the project's CPU kernels (:mod:`~.cpu_ext`),
:class:`AddNormFunction` does the forward in one pass (``z`` and the
normalised map) and the backward in one (``dz``, the branch's ``s * dz``,
and per-thread sums for the norm's weight and bias gradients).

The results equal the separate ops' to float rounding (the mean and
variance are summed in another order). Anything else (inference, other
dtypes or devices, CPU autocast, channels not a multiple of 16, a norm
without affine parameters, JIT tracing, ``torch.compile``/export) runs
the separate ops unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_ext

__all__ = ['AddNormFunction', 'add_norm']


class AddNormFunction(torch.autograd.Function):
    """``apply(x, y, scale, weight, bias, eps, kernels)`` -> ``(z, out)``:
    ``z = x + scale * y`` (``scale``: ``None`` or per-sample factors
    ``(N,)``) and ``out = F.layer_norm(z, (C,), weight, bias, eps)``;
    ``kernels`` is the loaded :mod:`~.cpu_ext` module."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Optional[Tensor],
                weight: Tensor, bias: Tensor, eps: float, kernels):
        z, out, mean, rstd = kernels.add_layer_norm(x, y, scale, weight,
                                                    bias, eps)
        ctx.save_for_backward(z, mean, rstd, weight, scale)
        ctx.kernels = kernels
        ctx.set_materialize_grads(False)  # an unused output's grad: None
        return z, out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Optional[Tensor], grad_out: Optional[Tensor]):
        z, mean, rstd, weight, scale = ctx.saved_tensors
        need_x, need_y, _, need_w, need_b = ctx.needs_input_grad[:5]
        if grad_out is None:  # only z was used: the norm has no gradient
            gz = torch.zeros_like(z) if grad_z is None else grad_z
            dy = gz if scale is None else gz * scale.view(
                (-1, ) + (1, ) * (z.dim() - 1))
            return (gz if need_x else None, dy if need_y else None, None,
                    torch.zeros_like(weight) if need_w else None,
                    torch.zeros_like(weight) if need_b else None, None, None)
        if grad_z is not None:
            grad_z = grad_z.contiguous()
        dz, dy, dw, db = ctx.kernels.add_layer_norm_backward(
            grad_z, grad_out.contiguous(), z, mean, rstd, weight, scale,
            need_y and scale is not None)
        if scale is None:
            dy = dz  # dz / dy are one gradient when y is not scaled
        return (dz if need_x else None, dy if need_y else None, None,
                dw if need_w else None, db if need_b else None, None, None)


def _applies(x: Tensor, y: Tensor, norm: nn.LayerNorm) -> bool:
    w, b = norm.weight, norm.bias
    return (torch.is_grad_enabled() and w is not None and b is not None
            and x.shape == y.shape and x.dim() >= 2
            and tuple(norm.normalized_shape) == (x.shape[-1], )
            and x.shape[-1] % 16 == 0
            and (x.requires_grad or y.requires_grad or w.requires_grad
                 or b.requires_grad)
            and cpu_ext.eager_cpu_float32(x, y, w, b))


def add_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm,
             scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(z, norm(z))`` with ``z = x + y``, or ``x + scale * y`` for
    per-sample factors ``scale`` ``(N, 1, ..., 1)`` (drop path), on
    channels-last maps ``(N, ..., C)``; one op where the module docstring
    says so, else the separate ops."""
    if _applies(x, y, norm):
        kernels = cpu_ext.load()
        if kernels is not None:
            flat = None if scale is None else scale.reshape(-1).contiguous()
            return AddNormFunction.apply(x.contiguous(), y.contiguous(),
                                         flat, norm.weight, norm.bias,
                                         norm.eps, kernels)
    z = x + y if scale is None else torch.addcmul(x, y, scale)
    return z, norm(z)
