"""``cpu`` backend: bi-level routing attention with the project's C++ CPU
kernels (:mod:`mmbiformer.ops.cpu_ext`), in the map's own token order.

The kernels read q, k and v where they are (views of the ``qkv`` projection,
``(N, H, W, channels)``; routed rows through pointers, plus a small transposed
copy of the routed keys for regions of more than 16 tokens) and write the
output straight into an ``(N, H, W, C)`` map: no region-major copies of q/k/v
or of the output, no top-k copies of K/V, and the exact routed FLOPs (unlike
the dense mode of the ``fused`` backend). The forward keeps the per-query
log-sum-exp; the backward recomputes the attention per region and accumulates
dK/dV per (batch, head). float32, head dims that are multiples of 16, ``S ==
R`` (self-attention over the same grid) and no key mask; elsewhere the callers
use the ``fused`` backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_ext

__all__ = ['BRACpuAttention', 'cpu_attention', 'cpu_backend_applies',
           'token_cpu_attention']


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
            ctx.save_for_backward(q, k, v, out, lse, idx)
        ctx.geometry, ctx.scale, ctx.kernels = geometry, scale, kernels
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, idx = ctx.saved_tensors
        h, w, nw = ctx.geometry
        go = grad_out.transpose(1, 2)
        if go.stride(-1) != 1:
            go = go.contiguous()
        dq, dk, dv = ctx.kernels.bra_backward(go, q.transpose(1, 2),
                                              k.transpose(1, 2),
                                              v.transpose(1, 2), out, lse,
                                              idx, h, w, nw, ctx.scale)
        return (dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2),
                None, None, None)


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
