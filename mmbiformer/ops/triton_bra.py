"""``triton`` backend: BRA attention as Triton kernels (CUDA).

Imported lazily (only when the backend is used). On the CPU the kernels run
under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this
module is imported (that is how the test suite exercises them).

Forward kernel: one program per (query block, batch, head, query region).
The routed keys of a query region are walked as one flat axis of
``topk * Tk`` tokens in tiles of ``BLOCK_N``; each tile looks the key region
of every token up in ``topk_index`` and loads the token from ``k``/``v`` in
place, so no copy of the routed K/V is made and small regions (1-16 tokens,
sizes that are not multiples of 16) share one tile. Online softmax; the
output and the log-sum-exp are written.

Backward kernel: the same walk recomputes the probabilities from the saved
log-sum-exp, accumulates ``dq`` in registers and adds ``dk``/``dv`` of every
tile to float32 buffers with atomic adds (several query regions can route
to the same key region). Gradients are therefore not bit-reproducible from
run to run, only equal to rounding.

The autograd function is :class:`BRATritonAttention` (stable name for FLOP
counters; see :mod:`mmbiformer.ops.flops`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .routing import RegionGraph

__all__ = ['BRATritonAttention', 'supports', 'triton_attention']

_MAX_HEAD_DIM = 256


def supports(q: Tensor) -> bool:
    """Whether the kernels handle ``q``'s dtype and head dim."""
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] <= _MAX_HEAD_DIM)


@triton.jit
def _bra_fwd_kernel(Q, K, V, IDX, MASK, OUT, LSE, scale, H, R, S, TQ, TK,
                    TOPK, D, DV, HAS_MASK: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)  # ((b * H) + m) * R + r
    r = pid_g % R
    bh = pid_g // R
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < TQ
    q_ptrs = Q + (pid_g * TQ + offs_m[:, None]) * D + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_keys = TOPK * TK
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kk = offs_n // TK
        tt = offs_n % TK
        s = tl.load(IDX + (b * R + r) * TOPK + kk, mask=n_ok, other=0)
        row = (bh * S + s) * TK + tt  # token row in the (B*H*S*TK) view
        k = tl.load(K + row[:, None] * D + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        valid = n_ok
        if HAS_MASK:
            km = tl.load(MASK + (b * S + s) * TK + tt, mask=n_ok, other=0)
            valid = valid & (km != 0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        qk = tl.where(valid[None, :], qk, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] * DV + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = OUT + (pid_g * TQ + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_g * TQ + offs_m, m_i + tl.log(l_safe), mask=m_ok)


@triton.jit
def _bra_bwd_kernel(Q, K, V, IDX, MASK, DO, LSE, DELTA, DQ, DK, DV_,
                    scale, H, R, S, TQ, TK, TOPK, D, DV,
                    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)
    r = pid_g % R
    bh = pid_g // R
    b = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < TQ
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + (pid_g * TQ + offs_m[:, None]) * D + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + (pid_g * TQ + offs_m[:, None]) * DV +
                 offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                 other=0.0)
    lse = tl.load(LSE + pid_g * TQ + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_g * TQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_keys = TOPK * TK
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kk = offs_n // TK
        tt = offs_n % TK
        s = tl.load(IDX + (b * R + r) * TOPK + kk, mask=n_ok, other=0)
        row = (bh * S + s) * TK + tt
        k = tl.load(K + row[:, None] * D + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + row[:, None] * DV + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        valid = n_ok[None, :] & m_ok[:, None]
        if HAS_MASK:
            km = tl.load(MASK + (b * S + s) * TK + tt, mask=n_ok, other=0)
            valid = valid & (km != 0)[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.where(valid, tl.exp(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        dk_t = tl.dot(tl.trans(ds.to(q.dtype)), q,
                      input_precision=PREC)
        dv_t = tl.dot(tl.trans(p.to(do.dtype)), do,
                      input_precision=PREC)
        tl.atomic_add(DK + row[:, None] * D + offs_d[None, :], dk_t,
                      mask=n_ok[:, None] & d_ok[None, :])
        tl.atomic_add(DV_ + row[:, None] * DV + offs_dv[None, :], dv_t,
                      mask=n_ok[:, None] & dv_ok[None, :])
    tl.store(DQ + (pid_g * TQ + offs_m[:, None]) * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _precision(q: Tensor) -> str:
    # float32 inputs: exact float32 dots (no TF32), like torch's matmul
    # defaults, so results match the other backends to ~1e-6
    return 'ieee' if q.dtype == torch.float32 else 'tf32'


def _pow2(x: int, lo: int = 16, hi: Optional[int] = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


def _blocks(tq: int, n_keys: int, d: int, dv: int):
    block_d, block_dv = _pow2(d), _pow2(dv)
    wide = max(block_d, block_dv) > 64
    block_m = _pow2(tq, hi=32 if wide else 64)
    block_n = _pow2(n_keys, hi=32 if wide else 64)
    return block_m, block_n, block_d, block_dv


class BRATritonAttention(torch.autograd.Function):
    """Triton BRA attention.

    ``apply(q, k, v, topk_index, key_mask, scale)`` with the layouts of
    :func:`mmbiformer.ops.bra_attention`.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                key_mask: Optional[Tensor], scale: float) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        idx = topk_index.contiguous()
        b, h, r, tq, d = q.shape
        s, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
        topk = idx.shape[-1]
        mask = (key_mask.contiguous().to(torch.int8)
                if key_mask is not None else idx)
        out = torch.empty(b, h, r, tq, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h, r, tq, dtype=torch.float32, device=q.device)
        bm, bn, bd, bdv = _blocks(tq, topk * tk, d, dv)
        grid = (triton.cdiv(tq, bm), b * h * r)
        _bra_fwd_kernel[grid](q, k, v, idx, mask, out, lse, scale, h, r, s,
                              tq, tk, topk, d, dv,
                              HAS_MASK=key_mask is not None,
                              PREC=_precision(q), BLOCK_M=bm,
                              BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
        ctx.save_for_backward(q, k, v, idx, mask, out, lse)
        ctx.scale = scale
        ctx.has_mask = key_mask is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, idx, mask, out, lse = ctx.saved_tensors
        b, h, r, tq, d = q.shape
        s, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
        topk = idx.shape[-1]
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dvv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        bm, bn, bd, bdv = _blocks(tq, topk * tk, d, dv)
        grid = (triton.cdiv(tq, bm), b * h * r)
        _bra_bwd_kernel[grid](q, k, v, idx, mask, do, lse, delta, dq, dk,
                              dvv, ctx.scale, h, r, s, tq, tk, topk, d, dv,
                              HAS_MASK=ctx.has_mask, PREC=_precision(q),
                              BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_D=bd, BLOCK_DV=bdv)
        return dq, dk.to(k.dtype), dvv.to(v.dtype), None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
                     scale: float) -> Tensor:
    """``triton`` backend of :func:`mmbiformer.ops.bra_attention`."""
    if q.device.type != 'cuda':
        from .functional import triton_available
        if not triton_available(q.device):
            raise RuntimeError(
                "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 "
                "set before import to run the kernels on the CPU); use "
                "backend='fused' on the CPU")
    if not supports(q):
        raise ValueError(
            f"backend='triton' supports float32/float16/bfloat16 and head "
            f'dims <= {_MAX_HEAD_DIM}, got {q.dtype} and d={q.shape[-1]}; '
            "use backend='fused'")
    return BRATritonAttention.apply(q, k, v, graph.topk_index,
                                    graph.key_mask, scale)
