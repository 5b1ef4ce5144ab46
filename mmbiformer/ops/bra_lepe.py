"""BRA and its LePE as one operator, for the C++ CPU kernels
(:func:`mmbiformer.models.accelerate.accelerate`).

:class:`~.module.BiLevelRoutingAttention` computes ``wo(bra(q, k, v) +
lepe(v))`` from the slices of one ``qkv`` projection. Autograd then sums
the two gradients of ``v`` and concatenates ``dq``, ``dk``, ``dv`` into the
projection's gradient: two more passes over the widest map of the layer.
``mmbiformer::bra_lepe`` takes ``qkv`` whole instead:

* forward: the LePE (a depthwise conv of ``v``) first, then the attention
  kernel adds its output into the LePE's map: one output, no separate sum;
* backward (``mmbiformer::bra_lepe_backward``): the LePE's input gradient
  first, then the attention kernel writes ``dq``, ``dk`` and ``dv`` (the
  LePE's plus its own) into one ``qkv``-shaped gradient; the LePE's
  weight gradient is the project's one-pass kernel.

It runs where the C++ attention kernels do (float32 on the CPU, at the
AVX-512 level, head dims multiples of 16, no padding):
:class:`AcceleratedRoutingAttention` calls it there and is the plain layer
everywhere else.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_bra, cpu_ext
from .accelerate import _autocast, depthwise_weight_grad, training_fusions
from .module import BiLevelRoutingAttention
from .routing import region_graph

__all__ = ['AcceleratedRoutingAttention', 'bra_lepe', 'fused_applies']


def _split(qkv: Tensor, qk_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    return qkv.split([qk_dim, qk_dim, qkv.shape[-1] - 2 * qk_dim], dim=-1)


def _kernels():
    kernels = cpu_ext.load()
    if kernels is None:
        raise RuntimeError('mmbiformer::bra_lepe needs the C++ CPU kernels, '
                           'which are not built here (python -m '
                           'mmbiformer.ops.cpu_ext says why)')
    return kernels


def _lepe(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    # the depthwise conv of the (N, H, W, C) map v, as (N, H, W, C)
    k = weight.shape[-1]
    out = F.conv2d(v.permute(0, 3, 1, 2), weight, bias, 1, k // 2, 1,
                   weight.shape[0])
    return out.permute(0, 2, 3, 1).contiguous()


@torch.library.custom_op('mmbiformer::bra_lepe', mutates_args=())
def bra_lepe(qkv: Tensor, topk_index: Tensor, weight: Tensor,
             bias: Optional[Tensor], n_win: int, heads: int, qk_dim: int,
             scale: float) -> Tuple[Tensor, Tensor]:
    """``bra(q, k, v) + lepe(v)`` ``(N, H, W, C)`` for ``q | k | v =
    qkv`` ``(N, H, W, 2 qk_dim + C)`` (the LePE a stride-1 "same"
    depthwise conv with ``weight`` ``(C, 1, k, k)`` and ``bias``), and the
    attention's log-sum-exp; the C++ CPU kernels only (float32)."""
    n, h, w, _ = qkv.shape
    q, k, v = _split(qkv, qk_dim)
    out = _lepe(v, weight, bias)
    rows = [cpu_bra._rows(t, heads) for t in (q, k, v)]
    _, lse = _kernels().bra_forward(
        *rows, topk_index.contiguous(), h, w, n_win, scale, True,
        out.view(n, h * w, heads, -1))
    return out, lse


@bra_lepe.register_fake
def _(qkv, topk_index, weight, bias, n_win, heads, qk_dim, scale):
    n, h, w, _ = qkv.shape
    return (qkv.new_empty(n, h, w, weight.shape[0]),
            qkv.new_empty(n, heads, h * w, dtype=torch.float32))


@torch.library.custom_op('mmbiformer::bra_lepe_backward', mutates_args=())
def bra_lepe_backward(grad: Tensor, qkv: Tensor, lse: Tensor,
                      topk_index: Tensor, weight: Tensor, n_win: int,
                      heads: int, qk_dim: int, scale: float
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dqkv, dweight, dbias)`` of :func:`bra_lepe`."""
    n, h, w, _ = qkv.shape
    k = weight.shape[-1]
    grad = grad.contiguous()
    q, kk, v = _split(qkv, qk_dim)
    # the LePE's input gradient: the same conv of the output gradient with
    # the kernel flipped
    dv_lepe = F.conv2d(grad.permute(0, 3, 1, 2), weight.flip([2, 3]), None,
                       1, k // 2, 1, weight.shape[0])
    dv_lepe = dv_lepe.permute(0, 2, 3, 1).contiguous()
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype)
    dq, dk, dv = _split(dqkv, qk_dim)
    _kernels().bra_backward(
        cpu_bra._rows(grad, heads),
        *(cpu_bra._rows(t, heads) for t in (q, kk, v)), lse.contiguous(),
        topk_index.contiguous(), h, w, n_win, scale,
        *(cpu_bra._rows(t, heads) for t in (dq, dk, dv)),
        cpu_bra._rows(dv_lepe, heads))
    del dv_lepe
    dweight = depthwise_weight_grad(v.permute(0, 3, 1, 2),
                                    grad.permute(0, 3, 1, 2), k)
    return dqkv, dweight, grad.sum((0, 1, 2))


@bra_lepe_backward.register_fake
def _(grad, qkv, lse, topk_index, weight, n_win, heads, qk_dim, scale):
    return (torch.empty_like(qkv), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    qkv, topk_index, weight, bias, n_win, heads, qk_dim, scale = inputs
    ctx.save_for_backward(qkv, output[1], topk_index, weight)
    ctx.args = (n_win, heads, qk_dim, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor, grad_lse: Optional[Tensor]):
    qkv, lse, topk_index, weight = ctx.saved_tensors
    dqkv, dweight, dbias = bra_lepe_backward(grad, qkv, lse, topk_index,
                                             weight, *ctx.args)
    return (dqkv, None, dweight, dbias if ctx.has_bias else None, None, None,
            None, None)


bra_lepe.register_autograd(_backward, setup_context=_setup_context)


def fused_applies(layer: BiLevelRoutingAttention, x: Tensor) -> bool:
    """Whether :class:`AcceleratedRoutingAttention` runs ``layer`` on ``x``
    through :func:`bra_lepe`: float32 on the CPU at the AVX-512 level
    (:func:`~.accelerate.training_fusions`), a stride-1 "same" depthwise
    ``Conv2d`` as the LePE, no padding, a backend that takes the C++
    kernels, head dims they take, a batch that is not empty, eager
    code."""
    if layer.lepe is None or layer.backend not in ('auto', 'cpu') or \
            x.dim() != 4 or x.device.type != 'cpu' or \
            x.dtype != torch.float32 or not training_fusions(x) or \
            _autocast(x):
        return False
    n, h, w, _ = x.shape
    if n == 0 or h % layer.n_win or w % layer.n_win or \
            torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    lepe = layer.lepe
    if not (isinstance(lepe, torch.nn.Conv2d) and lepe.stride == (1, 1)
            and lepe.groups == layer.dim and lepe.dilation == (1, 1)
            and lepe.padding == (lepe.kernel_size[0] // 2, ) * 2
            and lepe.kernel_size[0] == lepe.kernel_size[1]
            and lepe.padding_mode == 'zeros'):
        return False
    heads = layer.num_heads
    return (layer.qk_dim // heads) % 16 == 0 and \
        (layer.dim // heads) % 16 == 0 and cpu_ext.load() is not None


class AcceleratedRoutingAttention(BiLevelRoutingAttention):
    """A :class:`~.module.BiLevelRoutingAttention` whose attention and LePE
    run as one operator (:func:`bra_lepe`) where :func:`fused_applies`
    says so; the plain layer elsewhere (same parameters; the same function
    to float rounding)."""

    def forward(self, x: Tensor, return_routing: bool = False):
        if return_routing or not fused_applies(self, x):
            return super().forward(x, return_routing)
        if x.shape[-1] != self.dim:
            return super().forward(x)  # its error message
        qkv = self.qkv.qkv(x)
        q, k, _ = _split(qkv, self.qk_dim)
        graph = region_graph(q, k, self.n_win, self.topk, self.scale)
        out, _ = bra_lepe(qkv, graph.topk_index, self.lepe.weight,
                          self.lepe.bias, self.n_win, self.num_heads,
                          self.qk_dim, float(self.scale))
        return self.wo(out)
