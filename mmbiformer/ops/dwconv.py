"""``DepthwiseConv2d``: the depthwise convs of BiFormer (position embedding,
LePE) with a faster CPU backward.

A drop-in ``nn.Conv2d`` (same parameters, same forward call, so official
checkpoints load and outputs are bit-identical). When a float32 CPU input
needs gradients and the project's CPU kernels are built
(:mod:`mmbiformer.ops.cpu_ext`), the forward runs inside
:class:`DepthwiseConvFunction`, whose backward computes

* the input gradient as the same depthwise conv of the output gradient with
  the kernel flipped (oneDNN's fast forward path),
* the weight gradient with a channels-last C++ kernel that reads the input
  once per kernel row while the output-gradient row stays in cache (oneDNN's
  depthwise weight gradient for 5x5 kernels was the slowest op of a
  BiFormer-S training step: about 15 %, see ``docs/benchmarks.md``),
* the bias gradient as a sum.

The results equal ``nn.Conv2d``'s gradients to float rounding (the sums run
in another order). Anything else (inference, other dtypes or devices, CPU
autocast, JIT tracing, ``torch.compile``/export, strides or paddings other
than 1 and ``k // 2``) calls ``nn.Conv2d.forward`` unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_ext

__all__ = [
    'DepthwiseConv2d', 'DepthwiseConvFunction', 'depthwise_conv',
    'depthwise_input_grad'
]


def depthwise_conv(x: Tensor, weight: Tensor,
                   bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``, stride 1:
    the depthwise conv of an (N, C, H, W) map with a (C, 1, k, k) kernel."""
    k, c = weight.shape[-1], weight.shape[0]
    return F.conv2d(x, weight, bias, 1, k // 2, 1, c)


def depthwise_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    """Input gradient of :func:`depthwise_conv`: the same depthwise conv of
    ``grad_out`` (N, C, H, W) with the kernel flipped."""
    return depthwise_conv(grad_out, weight.flip([2, 3]))


class DepthwiseConvFunction(torch.autograd.Function):
    """``apply(x, weight, bias, kernels)``: :func:`depthwise_conv` with the
    backward described in the module docstring (``kernels`` is the loaded
    :mod:`~.cpu_ext` module)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias, kernels) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kernels = kernels
        ctx.has_bias = bias is not None
        return depthwise_conv(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = depthwise_input_grad(grad_out, weight)
        if need_w:

            def nhwc(t: Tensor) -> Tensor:
                if t.stride(1) != 1:
                    t = t.contiguous(memory_format=torch.channels_last)
                return t.permute(0, 2, 3, 1)

            dw = ctx.kernels.dwconv_weight_grad(nhwc(x), nhwc(grad_out), k)
        if need_b and ctx.has_bias:
            db = grad_out.sum((0, 2, 3))
        return dx, dw, db, None


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``nn.Conv2d`` (``groups == in == out channels``, stride 1,
    ``padding = kernel_size // 2``) with the faster CPU backward of
    :class:`DepthwiseConvFunction` (see the module docstring).

    Args:
        channels (int): Channels ``C``.
        kernel_size (int): Odd kernel size.
        bias (bool): Learn a bias. Defaults to True.
    """

    def __init__(self, channels: int, kernel_size: int,
                 bias: bool = True) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f'DepthwiseConv2d needs an odd kernel size, got '
                             f'{kernel_size}')
        super().__init__(channels, channels, kernel_size,
                         padding=kernel_size // 2, groups=channels,
                         bias=bias)

    def _use_kernel(self, x: Tensor) -> bool:
        return (torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad)
                and x.dim() == 4
                and cpu_ext.eager_cpu_float32(x, self.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        if self._use_kernel(x):
            kernels = cpu_ext.load()
            if kernels is not None:
                return DepthwiseConvFunction.apply(x, weight, self.bias,
                                                   kernels)
        return self._conv_forward(x, weight, self.bias)

    def forward_residual(self, x: Tensor) -> Tensor:
        """``x + self(x)``. In float32 (no autocast) as one conv whose
        kernel has the identity added to its centre tap: the same result to
        float rounding, one pass over the map instead of two, and in
        training no separate sum of the two input gradients. In lower
        precision ``1 + w`` would round away the tap's own digits, so
        there it is the plain sum."""
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32 \
                or torch.is_autocast_enabled(x.device.type):
            return x + self(x)
        c = self.kernel_size[0] // 2
        eye = torch.zeros_like(self.weight)
        eye[:, :, c, c] = 1.
        return self._conv(x, self.weight + eye)
