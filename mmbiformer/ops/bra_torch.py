"""The portable implementation of the BRA operator (torch only, any device).

Behind :func:`mmbiformer.ops.bra` where no kernel of the project applies
(other CPUs, dtypes or devices; ``backend='torch'``). It has the operator's
interface: :func:`forward` returns the output and the per-query
log-sum-exp, :func:`backward` the input gradients from them. No autograd
here: the registered operator ties the two together.

Two strategies, chosen by shape alone (so forward and backward agree):

* dense (small maps on the CPU, e.g. BiFormer's third stage at 224x224:
  2x2-token regions, top-16 of 49): every query attends to all ``L`` keys in
  one call of torch's CPU flash-attention kernel with an additive ``-inf``
  mask on the regions it does not route to. At most
  :data:`DENSE_MAX_RATIO` times the routed FLOPs, no copy of q, k or v.
* chunked (everything else): q, k, v are laid out by region ``(N, h, R,
  T, c)``; groups of (image, head, query region) are processed in chunks,
  each gathering only its routed key/value blocks (``index_select``, never
  an ``expand`` of all regions), so at most one chunk's top-k copies exist
  at a time. The backward gathers again, recomputes the probabilities from
  the log-sum-exp and accumulates dK/dV with ``index_add_``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

__all__ = ['backward', 'forward']


#: Upper bound on the elements of one chunk's gathered K/V plus attention
#: matrix (about 32 MB of float32).
CHUNK_ELEMS = 1 << 23
#: Dense strategy when ``R <= DENSE_MAX_RATIO * topk`` and ``L <=
#: DENSE_MAX_KEYS`` (on the CPU, where torch's flash kernel takes a mask).
DENSE_MAX_RATIO = 4
DENSE_MAX_KEYS = 1024
#: Within a chunk, torch's CPU flash kernel for query regions of at least
#: this many tokens with at least ``FLASH_MIN_KEYS`` routed keys, else two
#: matmuls and a softmax (measured, 2 threads, head dim 32, forward +
#: backward: 64 queries x 64 keys flash 48 ms, matmul 26 ms; 64 x 256
#: 62 / 69 ms; 256 x 2048 1273 / 1907 ms).
FLASH_MIN_QUERY_TOKENS = 8
FLASH_MIN_KEYS = 256
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flash_cpu():
    aten = torch.ops.aten
    return (aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention_for_cpu_backward)


def _flash_ok(q: Tensor, v: Tensor) -> bool:
    return (q.device.type == 'cpu' and q.dtype in _FLASH_DTYPES
            and q.shape[-1] == v.shape[-1])


def _dense(q: Tensor, v: Tensor, n_win: int, topk: int, heads: int) -> bool:
    regions, tokens = n_win * n_win, q.shape[1] * q.shape[2]
    return (_flash_ok(q, v) and regions <= DENSE_MAX_RATIO * topk
            and tokens <= DENSE_MAX_KEYS)


def _heads(t: Tensor, heads: int) -> Tensor:
    """``(N, H, W, heads * c)`` -> ``(N, heads, L, c)`` (a view where the
    strides allow)."""
    n, h, w, c = t.shape
    return t.reshape(n, h * w, heads, c // heads).transpose(1, 2)


def _unheads(t: Tensor, hw: Tuple[int, int]) -> Tensor:
    n, m, _, c = t.shape
    return t.transpose(1, 2).reshape(n, hw[0], hw[1], m * c).contiguous()


def dense_bias(topk_index: Tensor, n_win: int, hw: Tuple[int, int],
               dtype: torch.dtype,
               key_valid: Optional[Tensor] = None) -> Tensor:
    """Additive mask ``(N, 1, L, L)`` over the tokens of an ``hw`` map in
    row-major order: 0 where the key's region is routed from the query's
    region (and the key is valid), ``-inf`` elsewhere."""
    n, r, _ = topk_index.shape
    rh, rw = hw[0] // n_win, hw[1] // n_win
    dev = topk_index.device
    routed = torch.full((n, r, r), float('-inf'), dtype=dtype, device=dev)
    routed.scatter_(2, topk_index, 0.0)
    rows = torch.arange(hw[0], device=dev) // rh
    cols = torch.arange(hw[1], device=dev) // rw
    region_of = (rows[:, None] * n_win + cols[None, :]).reshape(-1)
    bias = routed.index_select(1, region_of).index_select(2, region_of)
    if key_valid is not None:
        bias = bias.masked_fill(~key_valid.reshape(1, 1, -1), float('-inf'))
    return bias.unsqueeze(1)


def _by_region(t: Tensor, n_win: int, heads: int) -> Tensor:
    """``(N, H, W, heads * c)`` -> ``(N, heads, R, T, c)`` (a copy)."""
    return rearrange(t, 'n (j y) (i x) (m c) -> n m (j i) (y x) c', j=n_win,
                     i=n_win, m=heads).contiguous()


def _from_region(t: Tensor, n_win: int, hw: Tuple[int, int]) -> Tensor:
    return rearrange(t, 'n m (j i) (y x) c -> n (j y) (i x) (m c)', j=n_win,
                     i=n_win, y=hw[0] // n_win).contiguous()


def _chunk(groups: int, tq: int, keys: int, d: int, dv: int) -> int:
    per_group = keys * (d + dv) + tq * keys + tq * (d + dv)
    return max(1, min(groups, CHUNK_ELEMS // max(per_group, 1)))


class _Chunks:
    """The chunked strategy's view of one call: region-major q, k, v
    flattened to ``(G, T, c)`` groups and the routed rows of each group."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                 key_valid: Optional[Tensor], n_win: int, heads: int):
        n, self.hw = q.shape[0], (q.shape[1], q.shape[2])
        self.n_win, self.heads = n_win, heads
        r, topk = topk_index.shape[1:]
        self.q = _by_region(q, n_win, heads).flatten(0, 2)  # (G, T, d)
        self.k = _by_region(k, n_win, heads).flatten(0, 2)
        self.v = _by_region(v, n_win, heads).flatten(0, 2)
        self.tokens = self.q.shape[1]
        bh = torch.arange(n * heads, device=q.device).view(n, heads, 1, 1)
        # routed rows of the flattened (N*h*R, T, .) k/v, per group
        self.rows = (bh * r + topk_index.view(n, 1, r, topk)).reshape(-1,
                                                                       topk)
        self.valid = None
        if key_valid is not None:  # (R, T) -> per group (G, topk * T)
            kv = rearrange(key_valid, '(j y) (i x) -> (j i) (y x)', j=n_win,
                           i=n_win)
            self.valid = kv.index_select(0, topk_index.reshape(-1)).view(
                n, 1, r, topk * self.tokens).expand(n, heads, r, -1)
            self.valid = self.valid.reshape(-1, topk * self.tokens)
        self.groups = self.q.shape[0]
        self.size = _chunk(self.groups, self.tokens, topk * self.tokens,
                           self.q.shape[-1], self.v.shape[-1])
        self.flash = (_flash_ok(q, v) and self.tokens >= FLASH_MIN_QUERY_TOKENS
                      and topk * self.tokens >= FLASH_MIN_KEYS)

    def ranges(self):
        for g0 in range(0, self.groups, self.size):
            yield g0, min(self.groups, g0 + self.size)

    def routed(self, g0: int, g1: int):
        """Routed rows, K and V ``(1, Gc, topk * T, c)`` and additive mask
        of groups ``g0:g1``."""
        gc = g1 - g0
        rows = self.rows[g0:g1].reshape(-1)
        k = self.k.index_select(0, rows).view(1, gc, -1, self.k.shape[-1])
        v = self.v.index_select(0, rows).view(1, gc, -1, self.v.shape[-1])
        bias = None
        if self.valid is not None:
            bias = torch.zeros(1, gc, 1, k.shape[2], dtype=k.dtype,
                               device=k.device)
            bias.masked_fill_(~self.valid[g0:g1].view(1, gc, 1, -1),
                              float('-inf'))
        return rows, k, v, bias

    def to_map(self, t: Tensor) -> Tensor:
        """``(G, T, c)`` groups back to an ``(N, H, W, heads * c)`` map."""
        n = self.groups // (self.heads * self.n_win**2)
        return _from_region(t.view(n, self.heads, self.n_win**2,
                                   self.tokens, -1), self.n_win, self.hw)


def _logits(q: Tensor, k: Tensor, bias: Optional[Tensor], scale: float,
            ct: torch.dtype) -> Tensor:
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)).mul_(scale)
    return s if bias is None else s.add_(bias.to(ct))


def _math_forward(q, k, v, bias, scale):
    ct = torch.promote_types(q.dtype, torch.float32)
    p = _logits(q, k, bias, scale, ct)
    m = p.amax(dim=-1, keepdim=True)
    p.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.to(ct)).div_(denom)
    return out.to(q.dtype), (m + denom.log()).squeeze(-1)


def _math_backward(do, q, k, v, out, lse, bias, scale):
    ct = torch.promote_types(q.dtype, torch.float32)
    q32, k32, do32 = q.to(ct), k.to(ct), do.to(ct)
    p = _logits(q32, k32, bias, scale, ct)
    p.sub_(lse.to(ct).unsqueeze(-1)).exp_()
    dv = torch.matmul(p.transpose(-2, -1), do32)
    ds = torch.matmul(do32, v.to(ct).transpose(-2, -1))
    ds.sub_((do32 * out.to(ct)).sum(-1, keepdim=True)).mul_(p).mul_(scale)
    return torch.matmul(ds, k32), torch.matmul(ds.transpose(-2, -1), q32), dv


def _index_add(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """``dst.index_add_(0, rows, src)``; single-threaded on the CPU, where
    torch's threaded version with repeated rows was about 100x slower for
    these small blocks (2 threads: 108 vs 1 ms per chunk)."""
    if dst.device.type != 'cpu' or torch.get_num_threads() == 1:
        dst.index_add_(0, rows, src)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dst.index_add_(0, rows, src)
    finally:
        torch.set_num_threads(threads)


def forward(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
            key_valid: Optional[Tensor], n_win: int, heads: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    """The operator's forward: ``(out (N, H, W, heads * dv), lse (N,
    heads, L) float32)``; see :func:`mmbiformer.ops.bra`."""
    hw = (q.shape[1], q.shape[2])
    if _dense(q, v, n_win, topk_index.shape[-1], heads):
        bias = dense_bias(topk_index, n_win, hw, q.dtype, key_valid)
        out, lse = _flash_cpu()[0](_heads(q, heads), _heads(k, heads),
                                   _heads(v, heads), 0.0, False,
                                   attn_mask=bias, scale=scale)
        return _unheads(out, hw), lse.float().contiguous()
    c = _Chunks(q, k, v, topk_index, key_valid, n_win, heads)
    out = c.q.new_empty(c.groups, c.tokens, c.v.shape[-1])
    lse = torch.empty(c.groups, c.tokens, dtype=torch.float32,
                      device=q.device)
    for g0, g1 in c.ranges():
        _, k_sel, v_sel, bias = c.routed(g0, g1)
        q_c = c.q[None, g0:g1]
        if c.flash:
            o_c, l_c = _flash_cpu()[0](q_c, k_sel, v_sel, 0.0, False,
                                       attn_mask=bias, scale=scale)
        else:
            o_c, l_c = _math_forward(q_c, k_sel, v_sel, bias, scale)
        out[g0:g1] = o_c[0]
        lse[g0:g1] = l_c[0]
    # lse in region-major order: only this module's backward reads it
    return c.to_map(out), lse.view(q.shape[0], heads, -1)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             lse: Tensor, topk_index: Tensor, key_valid: Optional[Tensor],
             n_win: int, heads: int, scale: float
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """The operator's backward: ``(dq, dk, dv)`` shaped like ``q, k, v``."""
    hw = (q.shape[1], q.shape[2])
    if _dense(q, v, n_win, topk_index.shape[-1], heads):
        bias = dense_bias(topk_index, n_win, hw, q.dtype, key_valid)
        grads = _flash_cpu()[1](_heads(grad_out, heads), _heads(q, heads),
                                _heads(k, heads), _heads(v, heads),
                                _heads(out, heads), lse, 0.0, False,
                                attn_mask=bias, scale=scale)
        return tuple(_unheads(g, hw) for g in grads)
    c = _Chunks(q, k, v, topk_index, key_valid, n_win, heads)
    do = _by_region(grad_out, n_win, heads).flatten(0, 2)
    o = _by_region(out, n_win, heads).flatten(0, 2)
    lse = lse.reshape(c.groups, c.tokens)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.empty_like(c.q)
    dk = torch.zeros(c.k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(c.v.shape, dtype=acc, device=q.device)
    tk = c.tokens
    for g0, g1 in c.ranges():
        rows, k_sel, v_sel, bias = c.routed(g0, g1)
        args = (do[None, g0:g1], c.q[None, g0:g1], k_sel, v_sel,
                o[None, g0:g1], lse[None, g0:g1])
        if c.flash:
            dq_c, dk_c, dv_c = _flash_cpu()[1](*args, 0.0, False,
                                               attn_mask=bias, scale=scale)
        else:
            dq_c, dk_c, dv_c = _math_backward(*args, bias, scale)
        dq[g0:g1] = dq_c[0]
        _index_add(dk, rows, dk_c.reshape(-1, tk, dk.shape[-1]).to(acc))
        _index_add(dv, rows, dv_c.reshape(-1, tk, dv.shape[-1]).to(acc))
    return (c.to_map(dq), c.to_map(dk.to(q.dtype)), c.to_map(dv.to(q.dtype)))
