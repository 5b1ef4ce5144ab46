"""``fused`` backend: chunked, recomputing BRA attention (any device).

Forward: the query regions are processed in chunks; for a chunk only its
routed key/value blocks are gathered (``index_select`` on a flattened view,
no ``expand``), attention runs on them (torch's CPU flash-attention kernel
for long routed key sequences, else two matmuls and a softmax, see
:data:`FLASH_MIN_KEYS`), and only the output and the per-query log-sum-exp
are kept.

Backward: per chunk the routed blocks are gathered again, the attention
gradient is computed from the saved log-sum-exp (no softmax matrix is kept
from the forward pass) and the key/value gradients of the blocks are
accumulated with ``index_add_`` into gradients the size of ``k``/``v``.

So at most one chunk's top-k copies of K/V (and one chunk's attention
matrix) exist at a time, in forward and in backward.

Small maps (dense mode): when the routed regions are a large share of all
regions (``S <= DENSE_MAX_RATIO * topk``) and the map is small (``S * Tk <=
DENSE_MAX_KEYS`` keys), the gathered blocks would be tiny matrices (e.g.
BiFormer's third stage at 224x224: 2x2-token regions, top-16 of 49) and the
per-block gathers and matmuls cost more than the arithmetic. Then every
query attends to all ``S * Tk`` keys in one call of torch's CPU
flash-attention kernel, with an additive ``-inf`` mask on the keys of the
regions that were not routed (and on masked keys): the same function, at
most ``DENSE_MAX_RATIO`` times the FLOPs, no top-k copies (measured on 2
threads, BiFormer-S stage 3, batch 8: 133 -> 49 ms forward + backward).

Token order: the dense mode does not need the queries grouped by region at
all. :class:`~mmbiformer.ops.BiLevelRoutingAttention` then calls
:func:`token_dense_attention` on views of its ``qkv`` output in the map's
own token order (``(N, h, L, d)`` with strides, no copy), with the routing
mask expanded per token pair; the flash kernel's output, laid out
``(N, L, h, d)`` in memory, is already the ``(N, H, W, C)`` map. That
saves the head-by-region rearrangement of q, k, v and of the output, and
their copies in backward (measured on 2 threads, BiFormer-S, batch 8,
224x224: the 18 third-stage blocks, forward + backward, see
``docs/benchmarks.md``).

The autograd functions are :class:`BRAFusedAttention` and
:class:`BRATokenDenseAttention` (stable names for FLOP counters; see
:mod:`mmbiformer.ops.flops`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .routing import RegionGraph

__all__ = ['BRAFusedAttention', 'BRATokenDenseAttention', 'CHUNK_ELEMS',
           'fused_attention', 'token_dense_attention', 'use_token_dense']

#: Upper bound on the elements of one chunk's gathered K/V plus attention
#: matrix (about 32 MB of float32 with the default).
CHUNK_ELEMS = 1 << 23

_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flash_ops():
    try:
        aten = torch.ops.aten
        fwd = aten._scaled_dot_product_flash_attention_for_cpu
        bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    except (AttributeError, RuntimeError):  # pragma: no cover - old torch
        return None
    return fwd, bwd


#: The chunked path uses torch's CPU flash-attention kernel only for
#: query blocks of at least this many tokens attending to at least
#: ``FLASH_MIN_KEYS`` routed keys; below that, two matmuls and a softmax per
#: chunk are faster. Measured with 2 threads, forward + backward, head dim
#: 32: 64 queries x 64 keys (BiFormer-S stage 1 at 224): flash 48 ms, matmul
#: 26 ms; 16 x 64 (stage 2): 32 / 22 ms; 9 x 144: 169 / 118 ms; 64 x 256:
#: 62 / 69 ms; 256 x 2048: 1273 / 1907 ms.
FLASH_MIN_QUERY_TOKENS = 8
FLASH_MIN_KEYS = 256


def _use_flash(q: Tensor, v: Tensor, keys: int) -> bool:
    return (q.device.type == 'cpu' and q.dtype in _FLASH_DTYPES
            and q.shape[-2] >= FLASH_MIN_QUERY_TOKENS
            and keys >= FLASH_MIN_KEYS
            and q.shape[-1] == v.shape[-1] and _flash_ops() is not None)


#: Dense mode (see the module docstring) when ``S <= DENSE_MAX_RATIO * K``
#: and ``S * Tk <= DENSE_MAX_KEYS``.
DENSE_MAX_RATIO = 4
DENSE_MAX_KEYS = 1024


def _dense_applies(q: Tensor, v: Tensor, regions: int, tokens: int,
                   topk: int) -> bool:
    """The dense mode's conditions for ``regions`` key regions of
    ``tokens`` tokens each (``q``/``v``: last dims are the channels)."""
    return (q.device.type == 'cpu' and q.dtype in _FLASH_DTYPES
            and q.shape[-1] == v.shape[-1] and _flash_ops() is not None
            and regions <= DENSE_MAX_RATIO * topk
            and regions * tokens <= DENSE_MAX_KEYS)


def _use_dense(q: Tensor, k: Tensor, v: Tensor, topk: int) -> bool:
    return _dense_applies(q, v, k.shape[2], k.shape[3], topk)


def use_token_dense(q: Tensor, v: Tensor, regions: int, tokens: int,
                    topk: int, heads: int) -> bool:
    """Whether the module may use :func:`token_dense_attention`: the dense
    mode's conditions on channels-last ``q`` ``(N, H, W, qk_dim)`` and
    ``v`` ``(N, H, W, dim)`` of equal head dims."""
    return q.shape[-1] % heads == 0 and _dense_applies(q, v, regions,
                                                        tokens, topk)


def token_dense_bias(topk_index: Tensor, n_win: int, region_hw: Tuple[int,
                                                                      int],
                     dtype: torch.dtype,
                     key_valid: Optional[Tensor] = None) -> Tensor:
    """Additive mask ``(B, 1, L, L)`` over the tokens of a ``(n_win *
    rh, n_win * rw)`` map in row-major order: 0 where the key token's
    region is routed from the query token's region (and the key is valid:
    ``key_valid`` ``(L,)`` bool), ``-inf`` elsewhere."""
    b, r, _ = topk_index.shape
    rh, rw = region_hw
    dev = topk_index.device
    routed = torch.full((b, r, r), float('-inf'), dtype=dtype, device=dev)
    routed.scatter_(2, topk_index, 0.0)
    rows = torch.arange(n_win * rh, device=dev) // rh
    cols = torch.arange(n_win * rw, device=dev) // rw
    region_of = (rows[:, None] * n_win + cols[None, :]).reshape(-1)
    bias = routed.index_select(1, region_of).index_select(2, region_of)
    if key_valid is not None:
        bias = bias.masked_fill(~key_valid.view(1, 1, -1), float('-inf'))
    return bias.unsqueeze(1)


class BRATokenDenseAttention(torch.autograd.Function):
    """Dense-mode BRA on token-order tensors (see the module docstring).

    ``apply(q, k, v, topk_index, bias, scale)``: q/k ``(N, h, L, d)``, v
    ``(N, h, L, dv)`` (any strides with a unit last stride), topk_index
    ``(N, R, K)`` (only for FLOP counters), bias from
    :func:`token_dense_bias`; returns ``(N, h, L, dv)``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                bias: Tensor, scale: float) -> Tensor:
        out, lse = _flash_ops()[0](q, k, v, 0.0, False, attn_mask=bias,
                                   scale=scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_ops()[1](grad_out, q, k, v, out, lse, 0.0,
                                     False, attn_mask=bias, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def token_dense_attention(q: Tensor, k: Tensor, v: Tensor,
                          topk_index: Tensor, n_win: int, heads: int,
                          scale: float,
                          key_valid: Optional[Tensor] = None) -> Tensor:
    """BRA attention of channels-last maps in token order.

    q, k ``(N, H, W, qk_dim)``, v ``(N, H, W, dim)`` (views of the ``qkv``
    output are fine), ``H``/``W`` multiples of ``n_win``, topk_index ``(N,
    n_win**2, K)``; returns ``(N, H, W, dim)``, equal to the ``reference``
    backend's result rearranged back to the map.
    """
    n, h, w, _ = q.shape
    region_hw = (h // n_win, w // n_win)

    def split_heads(t: Tensor) -> Tensor:
        return t.view(n, h * w, heads, t.shape[-1] // heads).transpose(1, 2)

    bias = token_dense_bias(topk_index, n_win, region_hw, q.dtype, key_valid)
    out = BRATokenDenseAttention.apply(split_heads(q), split_heads(k),
                                       split_heads(v), topk_index, bias,
                                       scale)
    return out.transpose(1, 2).reshape(n, h, w, v.shape[-1])


def _dense_bias(topk_index: Tensor, key_mask: Optional[Tensor], s: int,
                tq: int, tk: int, dtype: torch.dtype) -> Tensor:
    """Additive mask (B, 1, R*Tq, S*Tk): 0 on routed (valid) keys, -inf
    elsewhere."""
    b, r, _ = topk_index.shape
    bias = torch.full((b, r, s, 1), float('-inf'), dtype=dtype,
                      device=topk_index.device)
    bias.scatter_(2, topk_index.unsqueeze(-1), 0.0)
    bias = bias.expand(b, r, s, tk)
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None], float('-inf'))
    bias = bias.reshape(b, r, 1, s * tk)
    return bias.expand(b, r, tq, s * tk).reshape(b, 1, r * tq, s * tk)


def _chunk_groups(g: int, tq: int, kt: int, d: int, dv: int,
                  chunk_elems: int) -> int:
    """(batch, head, region) groups per chunk within ``chunk_elems``."""
    per_group = kt * (d + dv) + tq * kt + tq * (d + dv)
    return max(1, min(g, chunk_elems // max(per_group, 1)))


def _logits(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: float,
            ct: torch.dtype) -> Tensor:
    logits = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1))
    logits.mul_(scale)
    if bias is not None:
        logits.add_(bias.to(ct))
    return logits


def _math_forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                  scale: float) -> Tuple[Tensor, Tensor]:
    """q (B, G, Tq, d), k (B, G, Kt, d) -> out, lse (B, G, Tq) float32+."""
    ct = torch.promote_types(q.dtype, torch.float32)
    p = _logits(q, k, bias, scale, ct)
    m = p.amax(dim=-1, keepdim=True)
    p.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.to(ct)).div_(denom)
    lse = (m + denom.log()).squeeze(-1)
    return out.to(q.dtype), lse


def _math_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor, bias: Optional[Tensor], scale: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    ct = torch.promote_types(q.dtype, torch.float32)
    q32, k32, do32 = q.to(ct), k.to(ct), do.to(ct)
    p = _logits(q32, k32, bias, scale, ct)
    p.sub_(lse.to(ct).unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-2, -1), do32)
    ds = torch.matmul(do32, v.to(ct).transpose(-2, -1))
    delta = (do32 * out.to(ct)).sum(-1, keepdim=True)
    ds.sub_(delta).mul_(p).mul_(scale)
    dq = torch.matmul(ds, k32)
    dk = torch.matmul(ds.transpose(-2, -1), q32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _index_add(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """``dst.index_add_(0, rows, src)``, single-threaded on the CPU.

    torch's multi-threaded CPU ``index_add_`` with repeated rows is about
    100x slower than the single-threaded one for these small row blocks
    (measured with 2 threads: 108 ms vs 1 ms per chunk).
    """
    if dst.device.type != 'cpu' or torch.get_num_threads() == 1:
        dst.index_add_(0, rows, src)
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.index_add_(0, rows, src)
    finally:
        torch.set_num_threads(n)


def _group_index(topk_index: Tensor, heads: int, s: int, tk: int,
                 key_mask: Optional[Tensor]
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """Per (batch, head, query region) group: routed rows of the flattened
    ``(B*h*S, Tk, .)`` K/V, ``(G, K)``, and of the ``(B*S, Tk)`` key mask."""
    b, r, topk = topk_index.shape
    dev = topk_index.device
    bh = torch.arange(b * heads, device=dev).view(b, heads, 1, 1)
    kv_rows = (bh * s + topk_index.view(b, 1, r, topk)).reshape(-1, topk)
    mask_rows = None
    if key_mask is not None:
        bb = torch.arange(b, device=dev).view(b, 1, 1, 1)
        mask_rows = (bb * s + topk_index.view(b, 1, r, topk)).expand(
            b, heads, r, topk).reshape(-1, topk)
    return kv_rows, mask_rows


def _chunk_inputs(k2: Tensor, v2: Tensor, km2: Optional[Tensor],
                  kv_rows: Tensor, mask_rows: Optional[Tensor], g0: int,
                  g1: int, dtype: torch.dtype):
    """Routed K/V (1, Gc, K*Tk, .) and additive mask of groups g0:g1."""
    gc = g1 - g0
    rows = kv_rows[g0:g1].reshape(-1)
    k_sel = k2.index_select(0, rows).view(1, gc, -1, k2.shape[-1])
    v_sel = v2.index_select(0, rows).view(1, gc, -1, v2.shape[-1])
    bias = None
    if km2 is not None:
        valid = km2.index_select(0, mask_rows[g0:g1].reshape(-1))
        bias = torch.zeros(1, gc, 1, valid.numel() // gc, dtype=dtype,
                           device=k2.device)
        bias.masked_fill_(~valid.view(1, gc, 1, -1), float('-inf'))
    return rows, k_sel, v_sel, bias


class BRAFusedAttention(torch.autograd.Function):
    """Chunked BRA attention; see the module docstring.

    ``apply(q, k, v, topk_index, key_mask, scale, chunk)`` with the layouts
    of :func:`mmbiformer.ops.bra_attention`; ``chunk`` is the number of
    (batch, head, query region) groups processed at once, or 0 for the
    dense mode (all queries against all keys with a mask, see the module
    docstring).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                key_mask: Optional[Tensor], scale: float,
                chunk: int) -> Tensor:
        b, h, r, tq, d = q.shape
        s, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
        if chunk == 0:
            bias = _dense_bias(topk_index, key_mask, s, tq, tk, q.dtype)
            q4 = q.reshape(b, h, r * tq, d)
            k4 = k.reshape(b, h, s * tk, d)
            v4 = v.reshape(b, h, s * tk, dv)
            out, lse = _flash_ops()[0](q4, k4, v4, 0.0, False,
                                       attn_mask=bias, scale=scale)
            ctx.save_for_backward(q4, k4, v4, bias, out, lse)
            ctx.meta = (scale, chunk, True, b, h, r, s)
            return out.reshape(b, h, r, tq, dv)
        g = b * h * r
        q = q.contiguous()
        k2 = k.contiguous().view(b * h * s, tk, d)
        v2 = v.contiguous().view(b * h * s, tk, dv)
        km2 = key_mask.reshape(b * s, tk) if key_mask is not None else None
        kv_rows, mask_rows = _group_index(topk_index, h, s, tk, key_mask)
        flash = _use_flash(q, v, topk_index.shape[-1] * tk)
        q3 = q.view(1, g, tq, d)
        out = q.new_empty(1, g, tq, dv)
        lse = None
        for g0 in range(0, g, chunk):
            g1 = min(g, g0 + chunk)
            _, k_sel, v_sel, bias = _chunk_inputs(k2, v2, km2, kv_rows,
                                                  mask_rows, g0, g1, q.dtype)
            if flash:
                o_c, l_c = _flash_ops()[0](q3[:, g0:g1], k_sel, v_sel, 0.0,
                                           False, attn_mask=bias,
                                           scale=scale)
            else:
                o_c, l_c = _math_forward(q3[:, g0:g1], k_sel, v_sel, bias,
                                         scale)
            if lse is None:
                lse = l_c.new_empty(1, g, tq)
            out[:, g0:g1] = o_c
            lse[:, g0:g1] = l_c
        ctx.save_for_backward(q, k2, v2, km2, kv_rows, mask_rows, out, lse)
        ctx.meta = (scale, chunk, flash, b, h, r, s)
        return out.view(b, h, r, tq, dv)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.meta[1] == 0:
            return BRAFusedAttention._dense_backward(ctx, grad_out)
        q, k2, v2, km2, kv_rows, mask_rows, out, lse = ctx.saved_tensors
        scale, chunk, flash, b, h, r, s = ctx.meta
        _, _, _, tq, d = q.shape
        tk, dv = k2.shape[1], v2.shape[-1]
        g = b * h * r
        do3 = grad_out.contiguous().view(1, g, tq, dv)
        q3 = q.view(1, g, tq, d)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.empty_like(q3) if need_q else None
        dk = torch.zeros(k2.shape, dtype=acc,
                         device=q.device) if need_k else None
        dvv = torch.zeros(v2.shape, dtype=acc,
                          device=q.device) if need_v else None
        for g0 in range(0, g, chunk):
            g1 = min(g, g0 + chunk)
            rows, k_sel, v_sel, bias = _chunk_inputs(
                k2, v2, km2, kv_rows, mask_rows, g0, g1, q.dtype)
            args = (do3[:, g0:g1], q3[:, g0:g1], k_sel, v_sel,
                    out[:, g0:g1], lse[:, g0:g1])
            if flash:
                dq_c, dk_c, dv_c = _flash_ops()[1](
                    *args, 0.0, False, attn_mask=bias, scale=scale)
            else:
                dq_c, dk_c, dv_c = _math_backward(*args, bias, scale)
            if dq is not None:
                dq[:, g0:g1] = dq_c
            if dk is not None:
                _index_add(dk, rows, dk_c.reshape(-1, tk, d).to(acc))
            if dvv is not None:
                _index_add(dvv, rows, dv_c.reshape(-1, tk, dv).to(acc))
        dq = dq.view(b, h, r, tq, d) if dq is not None else None
        dk = dk.view(b, h, s, tk, d).to(q.dtype) if dk is not None else None
        if dvv is not None:
            dvv = dvv.view(b, h, s, tk, dv).to(q.dtype)
        return dq, dk, dvv, None, None, None, None

    @staticmethod
    def _dense_backward(ctx, grad_out: Tensor):
        q4, k4, v4, bias, out, lse = ctx.saved_tensors
        scale, _, _, b, h, r, s = ctx.meta
        do = grad_out.reshape(out.shape)
        dq, dk, dv = _flash_ops()[1](do, q4, k4, v4, out, lse, 0.0, False,
                                     attn_mask=bias, scale=scale)
        tq, tk = q4.shape[2] // r, k4.shape[2] // s
        return (dq.reshape(b, h, r, tq, -1), dk.reshape(b, h, s, tk, -1),
                dv.reshape(b, h, s, tk, -1), None, None, None, None)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
                    scale: float, chunk_elems: Optional[int] = None
                    ) -> Tensor:
    """``fused`` backend of :func:`mmbiformer.ops.bra_attention`.

    ``chunk_elems`` bounds the working set of one chunk of query regions
    (default :data:`CHUNK_ELEMS`).
    """
    b, h, r, tq, d = q.shape
    if _use_dense(q, k, v, graph.topk):
        return BRAFusedAttention.apply(q, k, v, graph.topk_index,
                                       graph.key_mask, scale, 0)
    kt = graph.topk * k.shape[3]
    chunk = _chunk_groups(b * h * r, tq, kt, d, v.shape[-1],
                          chunk_elems or CHUNK_ELEMS)
    return BRAFusedAttention.apply(q, k, v, graph.topk_index, graph.key_mask,
                                   scale, chunk)
