"""The Triton implementation of the BRA operator (CUDA).

Imported lazily. On the CPU the kernels run under Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this module is imported (that is how
the test suite exercises them).

Tensors are addressed through strides (:func:`_token_offsets`): the
kernels read q, k and v where they lie in the channels-last ``qkv``
projection, in the map's token order, and write the output map; no
region-major copies in or out.

Forward kernel: one program per (query block, batch, head, query region).
The routed keys of a query region are walked as one flat axis of
``topk * Tk`` tokens in tiles of ``BLOCK_N``; each tile looks the key region
of every token up in ``topk_index`` and loads the token from ``k``/``v`` in
place, so no copy of the routed K/V is made and small regions (1-16 tokens,
sizes that are not multiples of 16) share one tile. Online softmax; the
output and the log-sum-exp are written.

Backward (:data:`BACKWARD`): by default the same walk recomputes the
probabilities from the saved log-sum-exp, accumulates ``dq`` in registers
and adds ``dk``/``dv`` of every tile to float32 buffers with atomic adds
(several query regions can route to the same key region), so gradients are
equal to rounding from run to run, not bit for bit. Under
``torch.use_deterministic_algorithms(True)`` a second pair of kernels runs
instead: dQ per query block, then dK/dV per key block from the query
regions routed to its region (an inverted routing index), every gradient
row written once.

Both passes are operators of their own, ``mmbiformer::bra_triton_forward``
and ``mmbiformer::bra_triton_backward``, made with
``torch.library.triton_op``: every kernel is launched through
``torch.library.wrap_triton``, so where the public operator
(:mod:`~.bra`) is decomposed for ``torch.compile`` (CUDA), inductor sees
the kernels themselves and schedules them with the rest of the graph
instead of calling an opaque operator. Under the interpreter the kernels
cannot be traced (:func:`traceable`) and the public operator stays whole.

Precision: float16/bfloat16 inputs are read and written in their dtype;
the products accumulate in float32, as do the online softmax, the
log-sum-exp, ``dq`` and ``dk``/``dv`` (the atomic backward's buffers are
float32 too).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

__all__ = ['BACKWARD', 'applies', 'backward', 'backward_mode', 'forward',
           'inverted_routing', 'traceable']


_MAX_HEAD_DIM = 256


@triton.jit
def _token_offsets(b, m, reg, tok, NW, RW, sb, sm, sj, si, sy, sx):
    """Element offset of token ``tok`` of region ``reg`` (head ``m``, image
    ``b``): region ``reg`` is cell ``(reg // NW, reg % NW)`` of the region
    grid, token ``tok`` cell ``(tok // RW, tok % RW)`` of the region."""
    return (b * sb + m * sm + (reg // NW) * sj + (reg % NW) * si +
            (tok // RW) * sy + (tok % RW) * sx)


@triton.jit
def _split_group(pid_g, H, NREG):
    """Program axis 1 ``((b * H) + m) * NREG + region`` -> (b, m, region,
    b * H + m)."""
    reg = pid_g % NREG
    bh = pid_g // NREG
    return bh // H, bh % H, reg, bh


@triton.jit
def _load_tile(PTR, rows, cols, row_ok, col_ok):
    """``PTR[rows[:, None] + cols[None, :]]``, zero outside the masks."""
    return tl.load(PTR + rows[:, None] + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(PTR, rows, cols, row_ok, col_ok, value):
    """``PTR[rows[:, None] + cols[None, :]] = value`` (cast to ``PTR``'s
    dtype) inside the masks."""
    tl.store(PTR + rows[:, None] + cols[None, :],
             value.to(PTR.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bra_fwd_kernel(Q, K, V, IDX, MASK, OUT, LSE, scale, H, R, S, TQ, TK,
                    TOPK, D, DV, NWQ, RWQ, NWK, RWK,
                    sqb, sqm, sqj, sqi, sqy, sqx,
                    skb, skm, skj, ski, sky, skx,
                    svb, svm, svj, svi, svy, svx,
                    sob, som, soj, soi, soy, sox,
                    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)  # ((b * H) + m) * R + r
    b, m, r, bh = _split_group(pid_g, H, R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < TQ
    q_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sqb, sqm, sqj, sqi,
                            sqy, sqx)
    q = _load_tile(Q, q_rows, offs_d, m_ok, offs_d < D)
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
        k_rows = _token_offsets(b, m, s, tt, NWK, RWK, skb, skm, skj, ski,
                                sky, skx)
        k = _load_tile(K, k_rows, offs_d, n_ok, offs_d < D)
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
        v_rows = _token_offsets(b, m, s, tt, NWK, RWK, svb, svm, svj, svi,
                                svy, svx)
        v = _load_tile(V, v_rows, offs_dv, n_ok, offs_dv < DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                            input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sob, som, soj, soi,
                            soy, sox)
    _store_tile(OUT, o_rows, offs_dv, m_ok, offs_dv < DV, out)
    tl.store(LSE + pid_g * TQ + offs_m, m_i + tl.log(l_safe), mask=m_ok)


@triton.jit
def _bra_bwd_kernel(Q, K, V, IDX, MASK, OUT, DO, LSE, DELTA, DQ, DK, DV_,
                    scale, H, R, S, TQ, TK, TOPK, D, DV, NWQ, RWQ, NWK, RWK,
                    sqb, sqm, sqj, sqi, sqy, sqx,
                    skb, skm, skj, ski, sky, skx,
                    svb, svm, svj, svi, svy, svx,
                    sob, som, soj, soi, soy, sox,
                    sgb, sgm, sgj, sgi, sgy, sgx,
                    sdqb, sdqm, sdqj, sdqi, sdqy, sdqx,
                    sdkb, sdkm, sdkj, sdki, sdky, sdkx,
                    sdvb, sdvm, sdvj, sdvi, sdvy, sdvx,
                    ATOMIC_DKDV: tl.constexpr, HAS_MASK: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    """Backward of a block of queries, walking their routed keys as the
    forward does: recomputes the probabilities from the log-sum-exp and
    writes dQ. With ``ATOMIC_DKDV`` it also adds every tile's dK/dV to
    float32 buffers with atomic adds; without, it stores ``delta =
    rowsum(dO * O)`` for :func:`_bra_bwd_dkdv_kernel`."""
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)  # ((b * H) + m) * R + r
    b, m, r, bh = _split_group(pid_g, H, R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < TQ
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sqb, sqm, sqj, sqi,
                            sqy, sqx)
    q = _load_tile(Q, q_rows, offs_d, m_ok, d_ok)
    o_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sob, som, soj, soi,
                            soy, sox)
    g_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sgb, sgm, sgj, sgi,
                            sgy, sgx)
    do = _load_tile(DO, g_rows, offs_dv, m_ok, dv_ok)
    o = _load_tile(OUT, o_rows, offs_dv, m_ok, dv_ok)
    # softmax backward term: rowsum(dO * O)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if not ATOMIC_DKDV:
        tl.store(DELTA + pid_g * TQ + offs_m, delta, mask=m_ok)
    lse = tl.load(LSE + pid_g * TQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_keys = TOPK * TK
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kk = offs_n // TK
        tt = offs_n % TK
        s = tl.load(IDX + (b * R + r) * TOPK + kk, mask=n_ok, other=0)
        k_rows = _token_offsets(b, m, s, tt, NWK, RWK, skb, skm, skj, ski,
                                sky, skx)
        v_rows = _token_offsets(b, m, s, tt, NWK, RWK, svb, svm, svj, svi,
                                svy, svx)
        k = _load_tile(K, k_rows, offs_d, n_ok, d_ok)
        v = _load_tile(V, v_rows, offs_dv, n_ok, dv_ok)
        valid = n_ok[None, :] & m_ok[:, None]
        if HAS_MASK:
            km = tl.load(MASK + (b * S + s) * TK + tt, mask=n_ok, other=0)
            valid = valid & (km != 0)[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        p = tl.where(valid, tl.exp(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if ATOMIC_DKDV:
            dk_t = tl.dot(tl.trans(ds.to(q.dtype)), q,
                          input_precision=PREC)
            dv_t = tl.dot(tl.trans(p.to(do.dtype)), do,
                          input_precision=PREC)
            dk_rows = _token_offsets(b, m, s, tt, NWK, RWK, sdkb, sdkm, sdkj,
                                     sdki, sdky, sdkx)
            dv_rows = _token_offsets(b, m, s, tt, NWK, RWK, sdvb, sdvm, sdvj,
                                     sdvi, sdvy, sdvx)
            tl.atomic_add(DK + dk_rows[:, None] + offs_d[None, :], dk_t,
                          mask=n_ok[:, None] & d_ok[None, :])
            tl.atomic_add(DV_ + dv_rows[:, None] + offs_dv[None, :], dv_t,
                          mask=n_ok[:, None] & dv_ok[None, :])
    dq_rows = _token_offsets(b, m, r, offs_m, NWQ, RWQ, sdqb, sdqm, sdqj,
                             sdqi, sdqy, sdqx)
    _store_tile(DQ, dq_rows, offs_d, m_ok, d_ok, dq)


@triton.jit
def _bra_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, ROUTERS, START,
                         DK, DV_, scale, H, R, S, TQ, TK, TOPK, D, DV, NWQ,
                         RWQ, NWK, RWK,
                         sqb, sqm, sqj, sqi, sqy, sqx,
                         skb, skm, skj, ski, sky, skx,
                         svb, svm, svj, svi, svy, svx,
                         sgb, sgm, sgj, sgi, sgy, sgx,
                         sdkb, sdkm, sdkj, sdki, sdky, sdkx,
                         sdvb, sdvm, sdvj, sdvi, sdvy, sdvx,
                         HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK and dV of a block of key tokens of one key region, from the
    query tokens of every query region that routes to it (the inverted
    routing: ``ROUTERS[START[b, s]:START[b, s + 1]]``), walked as one flat
    axis of ``routers * TQ`` tokens; every key row is written once (no
    atomic adds)."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)  # ((b * H) + m) * S + s
    b, m, s, bh = _split_group(pid_g, H, S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < TK
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    k_rows = _token_offsets(b, m, s, offs_n, NWK, RWK, skb, skm, skj, ski,
                            sky, skx)
    v_rows = _token_offsets(b, m, s, offs_n, NWK, RWK, svb, svm, svj, svi,
                            svy, svx)
    k = _load_tile(K, k_rows, offs_d, n_ok, d_ok)
    v = _load_tile(V, v_rows, offs_dv, n_ok, dv_ok)
    key_ok = n_ok
    if HAS_MASK:
        km = tl.load(MASK + (b * S + s) * TK + offs_n, mask=n_ok, other=0)
        key_ok = key_ok & (km != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    first = tl.load(START + b * (S + 1) + s)
    n_q = (tl.load(START + b * (S + 1) + s + 1) - first) * TQ
    for u0 in range(0, n_q, BLOCK_M):
        offs_u = u0 + tl.arange(0, BLOCK_M)
        u_ok = offs_u < n_q
        r = tl.load(ROUTERS + b * R * TOPK + first + offs_u // TQ,
                    mask=u_ok, other=0).to(tl.int64)
        t = offs_u % TQ
        q_rows = _token_offsets(b, m, r, t, NWQ, RWQ, sqb, sqm, sqj, sqi,
                                sqy, sqx)
        g_rows = _token_offsets(b, m, r, t, NWQ, RWQ, sgb, sgm, sgj, sgi,
                                sgy, sgx)
        q = _load_tile(Q, q_rows, offs_d, u_ok, d_ok)
        do = _load_tile(DO, g_rows, offs_dv, u_ok, dv_ok)
        row = (bh * R + r) * TQ + t
        lse = tl.load(LSE + row, mask=u_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=u_ok, other=0.0)
        # transposed tiles: keys along rows, queries along columns
        qk_t = tl.dot(k, tl.trans(q), input_precision=PREC) * scale
        valid = key_ok[:, None] & u_ok[None, :]
        p_t = tl.where(valid, tl.exp(qk_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    dk_rows = _token_offsets(b, m, s, offs_n, NWK, RWK, sdkb, sdkm, sdkj,
                             sdki, sdky, sdkx)
    dv_rows = _token_offsets(b, m, s, offs_n, NWK, RWK, sdvb, sdvm, sdvj,
                             sdvi, sdvy, sdvx)
    _store_tile(DK, dk_rows, offs_d, n_ok, d_ok, dk)
    _store_tile(DV_, dv_rows, offs_dv, n_ok, dv_ok, dv)


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


class _Geometry(NamedTuple):
    """Sizes of one BRA call as the kernels see them: regions of query
    and key/value tokens on grids ``NW`` regions wide, ``RW`` tokens wide
    (see :func:`_token_offsets`)."""
    batch: int
    heads: int
    regions: int
    kv_regions: int
    tq: int
    tk: int
    topk: int
    d: int
    dv: int
    nwq: int
    rwq: int
    nwk: int
    rwk: int


def _token_order(t: Tensor, head_dim: int, rh: int,
                 rw: int) -> Tuple[int, ...]:
    """Strides of a channels-last map ``(N, H, W, heads * head_dim)`` (unit
    channel stride) cut into regions of ``rh x rw`` tokens."""
    sb, sy, sx, _ = t.stride()
    return (sb, head_dim, rh * sy, rw * sx, sy, sx)


def _launch_forward(g: _Geometry, q: Tensor, k: Tensor, v: Tensor,
                    idx: Tensor, mask: Optional[Tensor], out: Tensor,
                    scale: float, layouts) -> Tensor:
    """Runs the forward kernel (writes ``out``); returns the log-sum-exp
    ``(B, h, R, Tq)`` float32. ``layouts``: strides of q, k, v, out."""
    lse = torch.empty(g.batch, g.heads, g.regions, g.tq,
                      dtype=torch.float32, device=q.device)
    if lse.numel() == 0:  # empty batch: nothing to launch
        return lse
    bm, bn, bd, bdv = _blocks(g.tq, g.topk * g.tk, g.d, g.dv)
    grid = (triton.cdiv(g.tq, bm), g.batch * g.heads * g.regions)
    wrap_triton(_bra_fwd_kernel)[grid](
        q, k, v, idx, idx if mask is None else mask, out, lse, scale,
        g.heads, g.regions, g.kv_regions, g.tq, g.tk, g.topk, g.d, g.dv,
        g.nwq, g.rwq, g.nwk, g.rwk, *(x for lay in layouts for x in lay),
        HAS_MASK=mask is not None, PREC=_precision(q), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    return lse


#: the backward kernels:
#:
#: * ``'atomic'``: one kernel per query block; dK/dV are added to float32
#:   buffers with atomic adds, so they are equal to rounding from run to
#:   run, not bit for bit. The faster one at BiFormer's shapes on an H200
#:   (fewer launches; see docs/benchmarks.md).
#: * ``'inverted'``: dQ per query block, then dK/dV per key block over the
#:   query regions routed to its region (:func:`inverted_routing`); every
#:   gradient row is written once, in the input dtype: bit-reproducible,
#:   and no float32 gradient buffer.
#: * ``'auto'``: ``'inverted'`` while ``torch.use_deterministic_algorithms``
#:   is on, else ``'atomic'``.
BACKWARD = 'auto'


def backward_mode() -> str:
    """The backward variant the next backward pass uses (see
    :data:`BACKWARD`)."""
    if BACKWARD == 'auto':
        return ('inverted' if torch.are_deterministic_algorithms_enabled()
                else 'atomic')
    if BACKWARD not in ('atomic', 'inverted'):
        raise ValueError(f"triton_bra.BACKWARD={BACKWARD!r}: choose 'auto', "
                         "'atomic' or 'inverted'")
    return BACKWARD


def _grad_buffer(shape, like: Tensor, mode: str) -> Tensor:
    """The dK/dV (or qkv-gradient) buffer the backward kernels write: float32
    zeros for atomic adds, else uninitialised in ``like``'s dtype."""
    if mode == 'atomic':
        return torch.zeros(shape, dtype=torch.float32, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def inverted_routing(topk_index: Tensor, kv_regions: int
                     ) -> Tuple[Tensor, Tensor]:
    """Query regions grouped by the key region they route to.

    ``topk_index`` ``(B, R, K)`` -> ``routers`` ``(B, R * K)`` int32 (query
    region indices sorted by routed key region) and ``start`` ``(B, S + 1)``
    int32: the query regions that route to key region ``s`` of image ``b``
    are ``routers[b, start[b, s]:start[b, s + 1]]``.
    """
    b, r, k = topk_index.shape
    flat = topk_index.reshape(b, r * k)
    keys, order = torch.sort(flat, dim=1, stable=True)
    routers = torch.div(order, k, rounding_mode='floor').to(torch.int32)
    # where each key region's run begins in the sorted list: a search, not
    # a scatter-add (deterministic on every device)
    bounds = torch.arange(kv_regions + 1, device=flat.device)
    start = torch.searchsorted(keys, bounds.expand(b, -1).contiguous())
    return routers.contiguous(), start.to(torch.int32)


def _launch_backward(g: _Geometry, q: Tensor, k: Tensor, v: Tensor,
                     idx: Tensor, mask: Optional[Tensor], out: Tensor,
                     grad_out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                     dv: Tensor, scale: float, layouts, mode: str) -> None:
    """Runs the backward kernels of ``mode`` (see :data:`BACKWARD`): writes
    ``dq``, ``dk`` and ``dv`` (made by :func:`_grad_buffer`; in ``'atomic'``
    mode dK/dV are added into zeroed float32 buffers). ``layouts``: strides
    of q, k, v, out, grad_out, dq, dk, dv."""
    if lse.numel() == 0:  # empty batch: the gradients are empty too
        return
    lay = [x for layout in layouts for x in layout]
    sizes = (g.heads, g.regions, g.kv_regions, g.tq, g.tk, g.topk, g.d, g.dv,
             g.nwq, g.rwq, g.nwk, g.rwk)
    opts = dict(HAS_MASK=mask is not None, PREC=_precision(q))
    mask = idx if mask is None else mask
    bm, bn, bd, bdv = _blocks(g.tq, g.topk * g.tk, g.d, g.dv)
    grid = (triton.cdiv(g.tq, bm), g.batch * g.heads * g.regions)
    atomic = mode == 'atomic'
    delta = lse if atomic else torch.empty_like(lse)
    wrap_triton(_bra_bwd_kernel)[grid](
        q, k, v, idx, mask, out, grad_out, lse, delta, dq, dk, dv, scale,
        *sizes, *lay, ATOMIC_DKDV=atomic, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd, BLOCK_DV=bdv, **opts)
    if atomic:
        return
    routers, start = inverted_routing(idx, g.kv_regions)
    # keys of one region per program, its routers' queries as a flat axis
    bn_k, bm_q, _, _ = _blocks(g.tk, g.topk * g.tq, g.d, g.dv)
    grid = (triton.cdiv(g.tk, bn_k), g.batch * g.heads * g.kv_regions)
    # q, k, v, grad_out, dk, dv
    lay_kv = lay[:18] + lay[24:30] + lay[36:48]
    wrap_triton(_bra_bwd_dkdv_kernel)[grid](
        q, k, v, mask, grad_out, lse, delta, routers, start, dk, dv, scale,
        *sizes, *lay_kv, BLOCK_M=bm_q, BLOCK_N=bn_k, BLOCK_D=bd,
        BLOCK_DV=bdv, **opts)


def applies(q: Tensor, v: Tensor, heads: int) -> Optional[str]:
    """``None`` where the kernels take these inputs, else why not."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f'they take float32, float16 or bfloat16, not {q.dtype}'
    if max(q.shape[-1], v.shape[-1]) // heads > _MAX_HEAD_DIM:
        return f'they take head dims up to {_MAX_HEAD_DIM}'
    return None


def _setup(q: Tensor, v: Tensor, topk_index: Tensor,
           key_valid: Optional[Tensor], n_win: int, heads: int):
    n, h, w, _ = q.shape
    rh, rw = h // n_win, w // n_win
    d, dv = q.shape[-1] // heads, v.shape[-1] // heads
    g = _Geometry(n, heads, n_win**2, n_win**2, rh * rw, rh * rw,
                  topk_index.shape[-1], d, dv, n_win, rw, n_win, rw)
    mask = None
    if key_valid is not None:  # (H, W) -> (N, R, T) int8, region-major
        mask = key_valid.view(n_win, rh, n_win, rw).permute(0, 2, 1, 3)
        mask = mask.reshape(1, n_win**2, rh * rw).expand(n, -1, -1)
        mask = mask.to(torch.int8).contiguous()
    return g, mask, (rh, rw)


def _unit(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def traceable() -> bool:
    """Whether the kernels can be traced into a graph (``wrap_triton``):
    compiled ``@triton.jit`` functions, not the interpreter's."""
    return isinstance(_bra_fwd_kernel, triton.runtime.jit.JITFunction)


@triton_op('mmbiformer::bra_triton_forward', mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                key_valid: Optional[Tensor], n_win: int, heads: int,
                scale: float) -> Tuple[Tensor, Tensor]:
    q, k, v = _unit(q), _unit(k), _unit(v)
    idx = topk_index.contiguous()
    g, mask, (rh, rw) = _setup(q, v, idx, key_valid, n_win, heads)
    out = q.new_empty(v.shape)
    lse = _launch_forward(g, q, k, v, idx, mask, out, scale, [
        _token_order(q, g.d, rh, rw), _token_order(k, g.d, rh, rw),
        _token_order(v, g.dv, rh, rw), _token_order(out, g.dv, rh, rw)])
    return out, lse.view(g.batch, heads, -1)


@triton_op('mmbiformer::bra_triton_backward', mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 out: Tensor, lse: Tensor, topk_index: Tensor,
                 key_valid: Optional[Tensor], n_win: int, heads: int,
                 scale: float, inverted: bool
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, do = (_unit(t) for t in (q, k, v, out, grad_out))
    idx = topk_index.contiguous()
    g, mask, (rh, rw) = _setup(q, v, idx, key_valid, n_win, heads)
    mode = 'inverted' if inverted else 'atomic'
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = _grad_buffer(k.shape, k, mode)
    dv = _grad_buffer(v.shape, v, mode)
    layouts = [_token_order(t, g.d if i in (0, 1, 5, 6) else g.dv, rh, rw)
               for i, t in enumerate((q, k, v, out, do, dq, dk, dv))]
    _launch_backward(g, q, k, v, idx, mask, out, do,
                     lse.view(g.batch, heads, g.regions, g.tq), dq, dk, dv,
                     scale, layouts, mode)
    if mode == 'atomic':  # float32 buffers -> the inputs' dtype
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


def forward(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
            key_valid: Optional[Tensor], n_win: int, heads: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    """The operator's forward on ``(N, H, W, heads * c)`` maps read in
    place (any strides with a unit channel stride): ``(out, lse (N, heads,
    L))``, the log-sum-exp in region-major token order
    (``mmbiformer::bra_triton_forward``)."""
    return _forward_op(q, k, v, topk_index, key_valid, n_win, heads, scale)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             lse: Tensor, topk_index: Tensor, key_valid: Optional[Tensor],
             n_win: int, heads: int, scale: float
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's backward (``mmbiformer::bra_triton_backward``, the
    kernels of :func:`backward_mode`)."""
    return _backward_op(grad_out, q, k, v, out, lse, topk_index, key_valid,
                        n_win, heads, scale, backward_mode() == 'inverted')
