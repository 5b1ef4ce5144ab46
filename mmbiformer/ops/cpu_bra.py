"""``cpu`` backend: bi-level routing attention with the project's C++ CPU
kernels (:mod:`mmbiformer.ops.cpu_ext`), in the map's own token order.

The kernels read q, k and v where they are (views of the ``qkv`` projection,
``(N, H, W, channels)``; routed rows through pointers, plus a small transposed
copy of the routed keys for regions of more than 16 tokens) and write the
output straight into an ``(N, H, W, C)`` map: no region-major copies of q/k/v
or of the output, no top-k copies of K/V, and the exact routed FLOPs (unlike
the dense mode of the ``fused`` backend). The forward keeps only the
per-query log-sum-exp (not the output: the backward takes ``dO . o`` as
``sum_j P_ij dP_ij`` from the probabilities it recomputes); the backward
recomputes the attention per region and accumulates dK/dV per (batch,
head). For regions of 2, 4 or 8 tokens the logits read a grouped copy of
the keys; the forward keeps that copy in a buffer per calling thread (the
size of ``k`` at the largest call so far), so that it is not allocated
afresh at every call. float32, head dims that are multiples of 16, ``S ==
R`` (self-attention over the same grid) and no key mask; elsewhere the callers
use the ``fused`` backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_ext
from .dwconv import depthwise_conv, depthwise_input_grad

__all__ = ['BRACpuAttention', 'BRACpuLepeAttention', 'cpu_attention',
           'cpu_backend_applies', 'token_cpu_attention',
           'token_cpu_attention_lepe']


def cpu_backend_applies(q: Tensor, v: Tensor, head_dim: int,
                        v_head_dim: int) -> bool:
    """Whether the ``cpu`` kernels take these ``q``/``v`` (device, dtype)
    and head dims (builds the kernels on first use)."""
    if q.device.type != 'cpu' or q.dtype != torch.float32 or \
            v.dtype != torch.float32:
        return False
    if head_dim % 16 or v_head_dim % 16:
        return False
    return not cpu_ext.capturing_graph() and cpu_ext.load() is not None


class BRACpuAttention(torch.autograd.Function):
    """``apply(q, k, v, topk_index, geometry, scale)``: q/k ``(N, h, L,
    d)``, v ``(N, h, L, dv)`` (views with a unit last stride whose ``(N, L,
    h, d)`` transpose is the map's token order), topk_index ``(N, R, K)``,
    geometry ``(H, W, n_win)``; returns ``(N, h, L, dv)`` (a view of an
    ``(N, L, h, dv)`` tensor). The layout matches what FLOP counters expect
    of a token-order BRA call (:func:`mmbiformer.ops.flops.bra_flop_jit`).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                geometry: Tuple[int, int, int], scale: float) -> Tensor:
        kernels = cpu_ext.load()
        h, w, nw = geometry
        need_grad = any(ctx.needs_input_grad[:3])
        idx = topk_index.contiguous()
        out, lse = kernels.bra_forward(q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), idx, h, w, nw,
                                       scale, need_grad)
        if need_grad:
            ctx.save_for_backward(q, k, v, lse, idx)
        ctx.geometry, ctx.scale, ctx.kernels = geometry, scale, kernels
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, lse, idx = ctx.saved_tensors
        h, w, nw = ctx.geometry
        go = grad_out.transpose(1, 2)
        if go.stride(-1) != 1:
            go = go.contiguous()
        grads = [x.new_empty(x.transpose(1, 2).shape) for x in (q, k, v)]
        ctx.kernels.bra_backward(go, q.transpose(1, 2), k.transpose(1, 2),
                                 v.transpose(1, 2), lse, idx, h, w, nw,
                                 ctx.scale, *grads)
        dq, dk, dv = (x.transpose(1, 2) for x in grads)
        return dq, dk, dv, None, None, None


def _split_qkv(t: Tensor, qk_dim: int, heads: int):
    """q, k, v views ``(N, L, h, c)`` of a ``(N, H, W, 2 qk_dim + C)``
    map (or of its gradient)."""
    n, h, w, _ = t.shape
    # views (never copies: the kernels write into the gradient's views)
    return [x.view(n, h * w, heads, x.shape[-1] // heads)
            for x in t.split([qk_dim, qk_dim, t.shape[-1] - 2 * qk_dim], -1)]


class BRACpuLepeAttention(torch.autograd.Function):
    """``apply(qkv, topk_index, weight, bias, geometry, scale)``: the
    attention of the ``q | k | v`` channels of ``qkv`` ``(N, H, W, 2 qk_dim
    + C)`` plus the LePE of ``v`` (a depthwise conv with ``weight``
    ``(C, 1, k, k)`` and ``bias``, padding ``k // 2``); ``geometry`` is
    ``(H, W, n_win, heads, qk_dim)``; returns ``(N, H, W, C)``.

    The forward computes the LePE first and the kernel adds the attention
    into that map: one output tensor, no separate sum. The backward writes
    dq, dk and dv (attention plus LePE) into one qkv-shaped gradient (the
    kernel starts each dv row from the LePE's and adds the attention's):
    autograd then neither sums the two dv nor concatenates the three
    gradients behind the split.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, topk_index: Tensor, weight: Tensor,
                bias: Optional[Tensor], geometry: Tuple[int, ...],
                scale: float) -> Tensor:
        kernels = cpu_ext.load()
        h, w, nw, heads, qk_dim = geometry
        need_attn_grad = ctx.needs_input_grad[0]
        idx = topk_index.contiguous()
        v = qkv[..., 2 * qk_dim:]
        # the LePE first; the kernel adds the attention into its output
        lepe = depthwise_conv(v.permute(0, 3, 1, 2), weight,
                              bias).permute(0, 2, 3, 1)
        if not lepe.is_contiguous():
            lepe = lepe.contiguous()
        out = lepe.view(lepe.shape[0], h * w, heads, lepe.shape[-1] // heads)
        _, lse = kernels.bra_forward(*_split_qkv(qkv, qk_dim, heads), idx, h,
                                     w, nw, scale, need_attn_grad, out)
        ctx.save_for_backward(qkv, weight, lse, idx)
        ctx.geometry, ctx.scale, ctx.kernels = geometry, scale, kernels
        ctx.has_bias = bias is not None
        return lepe

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        qkv, weight, lse, idx = ctx.saved_tensors
        h, w, nw, heads, qk_dim = ctx.geometry
        need_qkv, _, need_w, need_b = ctx.needs_input_grad[:4]
        if qkv.numel() == 0:  # empty batch: nothing for the kernels to do
            return (torch.zeros_like(qkv) if need_qkv else None, None,
                    torch.zeros_like(weight) if need_w else None,
                    grad_out.new_zeros(weight.shape[0])
                    if need_b and ctx.has_bias else None, None, None)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        v = qkv[..., 2 * qk_dim:]
        dqkv = dw = db = None
        if need_qkv:
            dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
            go = grad_out.view(grad_out.shape[0], h * w, heads,
                               grad_out.shape[-1] // heads)
            # the LePE's dv; the kernel writes it plus the attention's
            dv_lepe = depthwise_input_grad(grad_out.permute(0, 3, 1, 2),
                                           weight).permute(0, 2, 3, 1)
            ctx.kernels.bra_backward(go, *_split_qkv(qkv, qk_dim, heads),
                                     lse, idx, h, w, nw, ctx.scale,
                                     *_split_qkv(dqkv, qk_dim, heads),
                                     dv_base=dv_lepe.reshape(go.shape))
            del dv_lepe
        if need_w:
            dw = ctx.kernels.dwconv_weight_grad(v, grad_out, weight.shape[-1])
        if need_b and ctx.has_bias:
            db = grad_out.sum((0, 1, 2))
        return dqkv, None, dw, db, None, None


def token_cpu_attention_lepe(qkv: Tensor, topk_index: Tensor, n_win: int,
                             heads: int, qk_dim: int, scale: float,
                             lepe: nn.Conv2d) -> Tensor:
    """BRA plus LePE of the channels-last ``qkv`` projection ``(N, H, W,
    2 qk_dim + C)`` (unit channel stride, ``H``/``W`` multiples of
    ``n_win``) with the C++ kernels, as :class:`BRACpuLepeAttention`;
    ``lepe`` is the depthwise ``(C, C, k, k)`` conv of the values
    (stride 1, padding ``k // 2``). Check :func:`cpu_backend_applies`
    first."""
    _, h, w, _ = qkv.shape
    return BRACpuLepeAttention.apply(qkv, topk_index, lepe.weight,
                                     lepe.bias, (h, w, n_win, heads, qk_dim),
                                     float(scale))


def token_cpu_attention(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                        n_win: int, heads: int, scale: float) -> Tensor:
    """BRA of channels-last maps in token order with the C++ kernels.

    q, k ``(N, H, W, qk_dim)``, v ``(N, H, W, dim)`` (views of the ``qkv``
    output are fine; unit channel stride), ``H``/``W`` multiples of
    ``n_win``, topk_index ``(N, n_win**2, K)``; returns ``(N, H, W, dim)``.
    Check :func:`cpu_backend_applies` first.
    """
    n, h, w, _ = q.shape

    def split_heads(t: Tensor) -> Tensor:
        return t.unflatten(-1, (heads, -1)).flatten(1, 2).transpose(1, 2)

    out = BRACpuAttention.apply(split_heads(q), split_heads(k),
                                split_heads(v), topk_index, (h, w, n_win),
                                float(scale))
    return out.transpose(1, 2).reshape(n, h, w, v.shape[-1])


def cpu_attention(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                  scale: float) -> Optional[Tensor]:
    """``cpu`` backend of :func:`mmbiformer.ops.bra_attention` for
    region-major ``(B, h, R, T, d)`` inputs with ``S == R`` a square number
    and no key mask, else ``None`` (the caller falls back to ``fused``).

    Region-major tokens ``r * T + t`` are the token order of an ``n_win x
    (n_win * T)`` map cut into ``1 x T`` regions, which the kernels take as
    they are.
    """
    b, h, r, t, d = q.shape
    nw = int(round(r ** 0.5))
    if k.shape[2] != r or nw * nw != r or \
            not cpu_backend_applies(q, v, d, v.shape[-1]):
        return None

    def tokens(x: Tensor) -> Tensor:  # (B, h, R, T, c) -> (B, h, R*T, c)
        return x.flatten(2, 3)

    out = BRACpuAttention.apply(tokens(q), tokens(k), tokens(v), topk_index,
                                (nw, nw * t, nw), float(scale))
    return out.unflatten(2, (r, t))
