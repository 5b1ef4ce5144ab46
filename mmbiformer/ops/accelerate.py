"""Opt-in speed-ups outside the attention that keep the modules and the
state dict: registered products and :func:`swap_modules`.

The model is built from plain torch modules; these swaps change how some of
them compute, not what: every swapped module stays an instance of
its torch class (hooks, ``isinstance`` checks and wrappers see what they
expect) with the same parameters, and the products go through registered
operators whose CPU registration picks the kernel, so ``torch.compile`` and
``torch.export`` see one node each.

* ``nn.Linear`` -> :class:`AcceleratedLinear`: in inference
  ``mmbiformer::linear``, whose CPU registration runs float32 products in
  oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead of torch's
  default CPU GEMM; other devices and dtypes run ``F.linear``. The
  operator is differentiable (its input gradient is a oneDNN product too),
  but the module trains through ``F.linear``: in an interleaved A/B of a
  BiFormer-S training step oneDNN's products saved 1.8 % at AVX-512 and
  nothing at AVX2, against 15.6 % and 3.1 % of an inference step
  (``docs/benchmarks.md``).
* ``Sequential(Linear, [Identity,] GELU, Linear)`` -> :class:`AcceleratedMlp`:
  where no gradient is needed (inference), the GELU runs as a oneDNN
  post-op of the first product (``mmbiformer::linear_gelu``), saving one
  pass over the widest activation of the block (5.6 % of a BiFormer-S
  inference step at AVX-512, 0.5 % at AVX2); in training it computes as
  the plain ``Sequential`` does.

:func:`mmbiformer.models.accelerate` applies these to the BiFormer
backbones of a model, together with the block-level transform.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'AcceleratedLinear', 'AcceleratedMlp', 'linear', 'linear_gelu',
    'swap_modules'
]


def _onednn_linear():
    if not (torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled):
        return None
    return getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise',
                   None)


@torch.library.custom_op('mmbiformer::linear', mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``; on the CPU in float32 through
    oneDNN."""
    return F.linear(x, weight, bias).contiguous()


@linear.register_kernel('cpu')
def _(x, weight, bias):
    op = _onednn_linear()
    if op is None or x.dtype != torch.float32 or \
            weight.dtype != torch.float32:
        return F.linear(x, weight, bias).contiguous()
    return op(x, weight, bias, 'none', [], '').contiguous()


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    dx = linear(grad, weight.t(), None) if need_x else None
    rows = grad.reshape(-1, grad.shape[-1])
    dw = rows.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    db = rows.sum(0) if need_b and ctx.has_bias else None
    return dx, dw, db


linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op('mmbiformer::linear_gelu', mutates_args=())
def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact, erf GELU); on the CPU
    in float32 one oneDNN product with the GELU as its post-op. No
    gradient: for inference (:class:`AcceleratedMlp` calls it only where
    none is needed)."""
    return F.gelu(F.linear(x, weight, bias)).contiguous()


@linear_gelu.register_kernel('cpu')
def _(x, weight, bias):
    op = _onednn_linear()
    if op is None or x.dtype != torch.float32 or \
            weight.dtype != torch.float32:
        return F.gelu(F.linear(x, weight, bias)).contiguous()
    return op(x, weight, bias, 'gelu', [], 'none').contiguous()


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _grad_needed(x: Tensor, *params: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in params))


class AcceleratedLinear(nn.Linear):
    """``nn.Linear`` computing through ``mmbiformer::linear`` where no
    gradient is needed (inference); in training it computes as
    ``nn.Linear`` does (oneDNN's products did not pay a measured share of a
    training step). Same parameters and results to float rounding."""

    def forward(self, x: Tensor) -> Tensor:
        if _grad_needed(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def _mlp_layers(seq: nn.Module):
    """``(fc1, fc2)`` of a ``Sequential(Linear, [Identity,] GELU, Linear)``
    with the exact GELU, else None."""
    if not isinstance(seq, nn.Sequential):
        return None
    layers = [m for m in seq if type(m) is not nn.Identity]
    if len(layers) != 3:
        return None
    fc1, act, fc2 = layers
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and type(act) is nn.GELU and act.approximate == 'none'):
        return None
    return fc1, fc2


def mlp_forward(mlp: 'AcceleratedMlp', x: Tensor) -> Tensor:
    """The MLP's output, the GELU fused into the first product where no
    gradient is needed."""
    fc1, fc2 = _mlp_layers(mlp)
    if _grad_needed(x, fc1.weight, fc2.weight):
        return nn.Sequential.forward(mlp, x)
    return fc2(linear_gelu(x, fc1.weight, fc1.bias))


class AcceleratedMlp(nn.Sequential):
    """A ``Sequential(Linear, [Identity,] GELU, Linear)`` MLP whose GELU is
    a post-op of the first product in inference (same modules, parameters
    and results to float rounding; forward hooks on the inner layers fire
    only in training)."""

    def forward(self, x: Tensor) -> Tensor:
        return mlp_forward(self, x)


def swap_modules(model: nn.Module) -> int:
    """Swap, in place, every plain ``nn.Linear`` of ``model`` for
    :class:`AcceleratedLinear` and every plain GELU MLP ``Sequential`` for
    :class:`AcceleratedMlp` (parameters, buffers and the state dict
    unchanged). Returns how many modules were swapped."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Sequential and _mlp_layers(module):
            module.__class__ = AcceleratedMlp
            count += 1
        elif type(module) is nn.Linear:
            module.__class__ = AcceleratedLinear
            count += 1
    return count
