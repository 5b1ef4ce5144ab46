"""``Linear``: ``nn.Linear`` whose CPU float32 products run in oneDNN where
that is faster than the default BLAS.

BiFormer's linear layers are narrow (64 and 128 channels in the first two
stages of the small models) and long (one row per token). For such shapes
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``) beats torch's
default CPU BLAS call (``addmm``/``mm``) in the forward and in the input
gradient; the weight gradient stays with the BLAS, which was faster there
(measured per shape of BiFormer-S, see ``docs/benchmarks.md``).

* Forward (training and inference): oneDNN.
* Input gradient ``grad @ weight``: oneDNN, reading the weight through its
  transposed view (a contiguous copy of it cost more than it saved on the
  short inputs of the last stages).
* Weight gradient: ``grad^T @ x`` (BLAS) when the layer widens
  (``out >= in``) or has fewer rows than input features, else
  ``(x^T @ grad)^T``: the BLAS was faster with the wider side as the rows
  of the product (e.g. 4.9 -> 4.0 ms for 192 -> 64 channels over 25088
  rows). Bias gradient: a sum.
* :func:`gelu_mlp` runs a block's ``fc2(gelu(fc1(x)))`` as one op
  (:class:`DnnMlpFunction`) whose backward computes the GELU gradient in
  place; without gradients the GELU is fused into ``fc1``.

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

__all__ = [
    'Linear', 'DnnLinearFunction', 'DnnMlpFunction', 'dnn_linear_applies',
    'gelu_and_grad_', 'gelu_and_grad_torch_', 'gelu_mlp'
]

def _dnn_op():
    ops = getattr(torch.ops, 'mkldnn', None)
    return getattr(ops, '_linear_pointwise', None) if ops is not None \
        else None


def dnn_linear_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`Linear` takes the oneDNN path for this input."""
    return (x.dim() >= 2 and cpu_ext.eager_cpu_float32(x, weight)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _dnn_op() is not None)


def _dnn(x: Tensor, weight: Tensor, bias: Optional[Tensor],
         post: str = 'none') -> Tensor:
    return _dnn_op()(x, weight, bias, post, [],
                     'none' if post == 'gelu' else '')


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    """``grad_out @ weight``: the input gradient of ``F.linear``."""
    return _dnn(grad_out, weight.t(), None)


def _weight_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """``grad_out^T @ x`` over all rows: the weight gradient of
    ``F.linear``, with the wider side as the rows of the product where the
    rows outnumber the input features (with fewer rows, e.g. stage 4's
    392 for 1536 features, the transposed copy of the result cost more
    than the product order saved: 4.9 against 3.9 ms)."""
    g2, x2 = _rows(grad_out), _rows(x)
    if g2.shape[1] >= x2.shape[1] or x2.shape[0] < x2.shape[1]:
        return g2.t().mm(x2)
    return x2.t().mm(g2).t().contiguous()


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
        dx = _input_grad(grad_out, weight) if need_x else None
        dw = _weight_grad(grad_out, x) if need_w else None
        db = _rows(grad_out).sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


class DnnMlpFunction(torch.autograd.Function):
    """``apply(x, w1, b1, w2, b2)``: ``F.linear(F.gelu(F.linear(x, w1,
    b1)), w2, b2)`` (exact GELU) as one op, products as in
    :class:`DnnLinearFunction`.

    Saves ``x`` and the hidden pre-activation only: the GELU output, which
    separate ops would keep for ``fc2``'s weight gradient, is recomputed in
    the backward (one hidden-size activation less per block held from the
    forward to the backward; in-process A/B on BiFormer-S, batch 8, 2
    threads: 2243 -> 2026 ms per training step, the freed memory is not
    faulted in again). The backward computes the GELU gradient in place in
    the hidden gradient it has just made, instead of in a fresh tensor of
    the hidden size.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Optional[Tensor],
                w2: Tensor, b2: Optional[Tensor]) -> Tensor:
        h = _dnn(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return _dnn(nn.functional.gelu(h), w2, b2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        db2 = _rows(grad_out).sum(0) if need_b2 and ctx.has_bias[1] else None
        if not (need_x or need_w1 or need_b1):
            dw2 = (_weight_grad(grad_out, nn.functional.gelu(h))
                   if need_w2 else None)
            return None, None, None, dw2, db2
        # dL/dh = (dy @ w2) * gelu'(h), in place in the fresh dy @ w2; the
        # GELU output for fc2's weight gradient is recomputed in that pass
        dh = _input_grad(grad_out, w2)
        g = gelu_and_grad_(h, dh)
        dw2 = _weight_grad(grad_out, g) if need_w2 else None
        del g
        dx = _input_grad(dh, w1) if need_x else None
        dw1 = _weight_grad(dh, x) if need_w1 else None
        db1 = _rows(dh).sum(0) if need_b1 and ctx.has_bias[0] else None
        return dx, dw1, db1, dw2, db2


def gelu_and_grad_(h: Tensor, grad: Tensor) -> Tensor:
    """Returns ``gelu(h)`` (exact GELU) and multiplies ``grad`` in place by
    ``gelu'(h)``. On contiguous float32 CPU tensors one pass of the C++
    kernel (``gelu_grad`` in ``mmbiformer/ops/csrc``: erfc and exp
    evaluated once per element, within a few ulps of the float64 result,
    where torch's float32 GELU is off by up to 1e-6 for negative inputs;
    ``tools/analysis/ab_train_step.py`` compares the two in a training
    step); else :func:`gelu_and_grad_torch_`."""
    kernels = cpu_ext.load() if h.device.type == 'cpu' else None
    if kernels is not None and h.dtype == grad.dtype == torch.float32 and \
            h.shape == grad.shape and h.is_contiguous() and \
            grad.is_contiguous():
        return kernels.gelu_grad(h, grad)
    return gelu_and_grad_torch_(h, grad)


def gelu_and_grad_torch_(h: Tensor, grad: Tensor) -> Tensor:
    """:func:`gelu_and_grad_` with torch's ``gelu`` and ``gelu_backward``
    (any device, dtype or layout)."""
    g = nn.functional.gelu(h)
    torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=grad)
    return g


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


def gelu_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """``fc2(F.gelu(fc1(x)))`` (exact GELU), the MLP of a transformer block.

    On the oneDNN path (see :func:`dnn_linear_applies`) with gradients it
    runs as one :class:`DnnMlpFunction`; without gradients the GELU is fused
    into ``fc1``'s product; otherwise the modules are called as they are.
    """
    if isinstance(fc1, Linear) and isinstance(fc2, Linear) and \
            (fc1._records_grad(x) or fc2._records_grad(x)) and \
            dnn_linear_applies(x, fc1.weight) and \
            dnn_linear_applies(x, fc2.weight):
        return DnnMlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight,
                                    fc2.bias)
    if isinstance(fc1, Linear):
        return fc2(fc1.forward_gelu(x))
    return fc2(nn.functional.gelu(fc1(x)))
