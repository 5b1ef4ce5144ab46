"""``fused`` backend: chunked, recomputing BRA attention (any device).

Forward: the query regions are processed in chunks; for a chunk only its
routed key/value blocks are gathered (``index_select`` on a flattened view,
no ``expand``), attention runs on them (torch's fused CPU flash-attention
kernel where available, else an explicit matmul/softmax), and only the
output and the per-query log-sum-exp are kept.

Backward: per chunk the routed blocks are gathered again, the attention
gradient is computed from the saved log-sum-exp (no softmax matrix is kept
from the forward pass) and the key/value gradients of the blocks are
accumulated with ``index_add_`` into gradients the size of ``k``/``v``.

So at most one chunk's top-k copies of K/V (and one chunk's attention
matrix) exist at a time, in forward and in backward.

The autograd function is :class:`BRAFusedAttention` (a stable name for FLOP
counters; see :mod:`mmbiformer.ops.flops`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import gather_blocks, gather_key_mask
from .routing import RegionGraph

__all__ = ['BRAFusedAttention', 'fused_attention', 'CHUNK_ELEMS']

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


#: Regions with fewer query tokens use the matmul path: torch's CPU
#: flash kernel is slower than two matmuls for such short query blocks.
FLASH_MIN_QUERY_TOKENS = 8


def _use_flash(q: Tensor, v: Tensor) -> bool:
    return (q.device.type == 'cpu' and q.dtype in _FLASH_DTYPES
            and q.shape[-2] >= FLASH_MIN_QUERY_TOKENS
            and q.shape[-1] == v.shape[-1] and _flash_ops() is not None)


def _chunk_regions(b: int, h: int, r: int, tq: int, kt: int, d: int,
                   dv: int, chunk_elems: int) -> int:
    per_region = b * h * (kt * (d + dv) + tq * kt + tq * (d + dv))
    return max(1, min(r, chunk_elems // max(per_region, 1)))


def _mask_bias(mask: Optional[Tensor], h: int, dtype: torch.dtype
               ) -> Optional[Tensor]:
    """(B, Rc, K*Tk) bool -> additive (B, h*Rc, 1, K*Tk) mask."""
    if mask is None:
        return None
    b, rc, kt = mask.shape
    bias = torch.zeros(b, 1, rc, kt, dtype=dtype, device=mask.device)
    bias.masked_fill_(~mask.unsqueeze(1), float('-inf'))
    return bias.expand(b, h, rc, kt).reshape(b, h * rc, 1, kt)


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


class BRAFusedAttention(torch.autograd.Function):
    """Chunked BRA attention; see the module docstring.

    ``apply(q, k, v, topk_index, key_mask, scale, chunk_regions)`` with the
    layouts of :func:`mmbiformer.ops.bra_attention`.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                key_mask: Optional[Tensor], scale: float,
                chunk: int) -> Tensor:
        b, h, r, tq, _ = q.shape
        s = k.shape[2]
        dv = v.shape[-1]
        k = k.contiguous()
        v = v.contiguous()
        graph = RegionGraph(topk_index, s, key_mask)
        flash = _use_flash(q, v)
        out = q.new_empty(b, h, r, tq, dv)
        lse = None
        for r0 in range(0, r, chunk):
            r1 = min(r, r0 + chunk)
            rc = r1 - r0
            flat = graph.flat_index(h, r0, r1)
            k_sel = gather_blocks(k, flat).view(b, h * rc, -1, k.shape[-1])
            v_sel = gather_blocks(v, flat).view(b, h * rc, -1, dv)
            q_c = q[:, :, r0:r1].reshape(b, h * rc, tq, -1)
            bias = _mask_bias(gather_key_mask(graph, r0, r1), h, q.dtype)
            if flash:
                o_c, l_c = _flash_ops()[0](q_c, k_sel, v_sel, 0.0, False,
                                           attn_mask=bias, scale=scale)
            else:
                o_c, l_c = _math_forward(q_c, k_sel, v_sel, bias, scale)
            if lse is None:
                lse = l_c.new_empty(b, h, r, tq)
            out[:, :, r0:r1] = o_c.view(b, h, rc, tq, dv)
            lse[:, :, r0:r1] = l_c.view(b, h, rc, tq)
        ctx.save_for_backward(q, k, v, topk_index, key_mask, out, lse)
        ctx.scale = scale
        ctx.chunk = chunk
        ctx.flash = flash
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, topk_index, key_mask, out, lse = ctx.saved_tensors
        scale, chunk, flash = ctx.scale, ctx.chunk, ctx.flash
        b, h, r, tq, d = q.shape
        s, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
        graph = RegionGraph(topk_index, s, key_mask)
        grad_out = grad_out.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = torch.empty_like(q) if need_q else None
        acc = torch.promote_types(q.dtype, torch.float32)
        dk = torch.zeros(b * h * s, tk, d, dtype=acc,
                         device=q.device) if need_k else None
        dvv = torch.zeros(b * h * s, tk, dv, dtype=acc,
                          device=q.device) if need_v else None
        for r0 in range(0, r, chunk):
            r1 = min(r, r0 + chunk)
            rc = r1 - r0
            flat = graph.flat_index(h, r0, r1)
            k_sel = gather_blocks(k, flat).view(b, h * rc, -1, d)
            v_sel = gather_blocks(v, flat).view(b, h * rc, -1, dv)
            q_c = q[:, :, r0:r1].reshape(b, h * rc, tq, d)
            o_c = out[:, :, r0:r1].reshape(b, h * rc, tq, dv)
            do_c = grad_out[:, :, r0:r1].reshape(b, h * rc, tq, dv)
            l_c = lse[:, :, r0:r1].reshape(b, h * rc, tq)
            bias = _mask_bias(gather_key_mask(graph, r0, r1), h, q.dtype)
            if flash:
                dq_c, dk_c, dv_c = _flash_ops()[1](
                    do_c, q_c, k_sel, v_sel, o_c, l_c, 0.0, False,
                    attn_mask=bias, scale=scale)
            else:
                dq_c, dk_c, dv_c = _math_backward(do_c, q_c, k_sel, v_sel,
                                                  o_c, l_c, bias, scale)
            if dq is not None:
                dq[:, :, r0:r1] = dq_c.view(b, h, rc, tq, d)
            idx = flat.reshape(-1)
            if need_k:
                dk.index_add_(0, idx, dk_c.reshape(-1, tk, d).to(acc))
            if need_v:
                dvv.index_add_(0, idx, dv_c.reshape(-1, tk, dv).to(acc))
        dk_out = dk.view(b, h, s, tk, d).to(k.dtype) if need_k else None
        dv_out = dvv.view(b, h, s, tk, dv).to(v.dtype) if need_v else None
        return dq, dk_out, dv_out, None, None, None, None


def fused_attention(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
                    scale: float, chunk_elems: Optional[int] = None
                    ) -> Tensor:
    """``fused`` backend of :func:`mmbiformer.ops.bra_attention`.

    ``chunk_elems`` bounds the working set of one chunk of query regions
    (default :data:`CHUNK_ELEMS`).
    """
    b, h, r, tq, d = q.shape
    kt = graph.topk * k.shape[3]
    chunk = _chunk_regions(b, h, r, tq, kt, d, v.shape[-1],
                           chunk_elems or CHUNK_ELEMS)
    return BRAFusedAttention.apply(q, k, v, graph.topk_index, graph.key_mask,
                                   scale, chunk)
