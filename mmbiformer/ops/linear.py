"""``Linear``: ``nn.Linear`` whose CPU float32 products run in oneDNN where
that is faster than the default BLAS.

BiFormer's linear layers are narrow (64 and 128 channels in the first two
stages of the small models) and long (one row per token). For such shapes
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``) beats torch's
default CPU BLAS call (``addmm``) in the forward and in the input gradient
of long inputs; the weight gradient stays with the BLAS, which was faster
there (measured per shape of BiFormer-S, see ``docs/benchmarks.md``).

* Forward (training and inference): oneDNN.
* Input gradient: oneDNN for at least :data:`DNN_GRAD_MIN_ROWS` rows,
  else the BLAS (oneDNN was slower on BiFormer-S's last stage, 392 rows).
* Weight and bias gradients: ``grad^T @ x`` (BLAS) and a sum.

The results equal ``nn.Linear``'s to float rounding (another summation
order). Anything else (other dtypes or devices, CPU autocast, oneDNN
unavailable or disabled, JIT tracing, ``torch.compile``/export) calls
``nn.Linear.forward`` unchanged; parameters and their names are those of
``nn.Linear``, so checkpoints load either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_ext

__all__ = ['Linear', 'DnnLinearFunction', 'dnn_linear_applies']

#: Rows (tokens) from which the input gradient runs in oneDNN.
DNN_GRAD_MIN_ROWS = 2048


def _dnn_op():
    ops = getattr(torch.ops, 'mkldnn', None)
    return getattr(ops, '_linear_pointwise', None) if ops is not None \
        else None


def dnn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`Linear` takes the oneDNN path for this input."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() >= 2
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled('cpu')
            and not cpu_ext.capturing_graph() and _dnn_op() is not None)


def _dnn(x: Tensor, weight: Tensor, bias: Optional[Tensor],
         post: str = 'none') -> Tensor:
    return _dnn_op()(x, weight, bias, post, [],
                     'none' if post == 'gelu' else '')


class DnnLinearFunction(torch.autograd.Function):
    """``apply(x, weight, bias)``: ``F.linear(x, weight, bias)`` with the
    products described in the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor,
                bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        dx = dw = db = None
        if need_x:
            if g2.shape[0] >= DNN_GRAD_MIN_ROWS:
                dx = _dnn(grad_out, weight.t().contiguous(), None)
            else:
                dx = g2.mm(weight).view(*grad_out.shape[:-1],
                                        weight.shape[1])
        if need_w:
            dw = g2.t().mm(x.reshape(-1, x.shape[-1]))
        if need_b and ctx.has_bias:
            db = g2.sum(0)
        return dx, dw, db


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same arguments, parameters and results to
    float rounding) with the oneDNN CPU path of the module docstring."""

    def _records_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or
            (self.bias is not None and self.bias.requires_grad))

    def forward(self, x: Tensor) -> Tensor:
        if not dnn_linear_applies(x, self.weight):
            return super().forward(x)
        if self._records_grad(x):
            return DnnLinearFunction.apply(x, self.weight, self.bias)
        return _dnn(x, self.weight, self.bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``F.gelu(self(x))`` (exact GELU); on the oneDNN path without
        gradients the GELU is fused into the product."""
        if dnn_linear_applies(x, self.weight) and not self._records_grad(x):
            return _dnn(x, self.weight, self.bias, 'gelu')
        return nn.functional.gelu(self(x))
