"""BRA through torch's block-sparse FlexAttention: the ``flex`` backend.

A candidate against the Triton kernels: torch's own
``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the
:class:`~.routing.RegionGraph`. Plain torch code, differentiated by
FlexAttention's own autograd; not a registration of the BRA operator, so
``torch.compile`` sees (and fuses) the FlexAttention call itself.

Layout. FlexAttention skips work block by block over a sequence, so the
tokens are permuted region-major: ``(N, H, W, heads * c)`` ->
``(N, heads, R' * T', c)``, where every region's ``T = rh * rw`` tokens are
contiguous and padded to ``T'`` slots so that regions tile the blocks
(:func:`flex_geometry`):

* ``T <= block``: ``T'`` is the next power of two >= ``T`` and one block
  holds ``block / T'`` regions; the region count is padded to ``R'``, a
  multiple of that (padding regions are routed nowhere);
* ``T > block``: ``T'`` is the next multiple of ``block`` and a region
  spans ``T' / block`` blocks.

A (query block, key block) pair is computed when any query region of the
first routes to any key region of the second; ``mask_mod`` keeps the
result exact (routing and padding, per token pair). Where a block holds
several regions the computed area exceeds the routed one:
:func:`block_stats` gives the numbers (see docs/benchmarks.md).

On the CPU, torch 2.14's FlexAttention runs forward only (inference); its
backward needs CUDA. Outside ``torch.compile`` the call goes through a
compiled FlexAttention when :data:`COMPILE` is true (the default; torch's
uncompiled FlexAttention materialises the full ``L x L`` scores).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .routing import RegionGraph

__all__ = ['BLOCK', 'COMPILE', 'block_mask', 'block_stats', 'flex_geometry',
           'forward']

#: FlexAttention's block (query and key side); 128 is torch's default
BLOCK = 128
#: outside torch.compile, call a compiled FlexAttention (see module doc)
COMPILE = True
_compiled = None


class FlexGeometry(NamedTuple):
    """How one map's regions are laid out in FlexAttention's sequence."""
    regions: int        # R
    tokens: int         # T = rh * rw
    slots: int          # T' >= T, tokens per region in the sequence
    padded_regions: int  # R' >= R
    block: int

    @property
    def length(self) -> int:
        return self.padded_regions * self.slots

    @property
    def blocks(self) -> int:
        return self.length // self.block


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def flex_geometry(hw: Tuple[int, int], n_win: int,
                  block: Optional[int] = None) -> FlexGeometry:
    """The region-major layout of an ``hw`` map with ``n_win ** 2``
    regions for FlexAttention blocks of ``block`` tokens (default
    :data:`BLOCK`)."""
    block = int(block or BLOCK)
    r = n_win * n_win
    t = (hw[0] // n_win) * (hw[1] // n_win)
    if t <= block:
        slots = _next_pow2(t)
        if block % slots:
            raise ValueError(f'block={block} must be a power of two')
        per_block = block // slots
        padded = -(-r // per_block) * per_block
    else:
        slots = -(-t // block) * block
        padded = r
    return FlexGeometry(r, t, slots, padded, block)


def _slot_valid(g: FlexGeometry, hw: Tuple[int, int], n_win: int,
                key_valid: Optional[Tensor], device) -> Tensor:
    """``(R' * T',)`` bool: which sequence slots hold a (valid) token."""
    valid = torch.zeros(g.padded_regions, g.slots, dtype=torch.bool,
                        device=device)
    if key_valid is None:
        valid[:g.regions, :g.tokens] = True
    else:
        valid[:g.regions, :g.tokens] = rearrange(
            key_valid, '(j y) (i x) -> (j i) (y x)', j=n_win, i=n_win)
    return valid.reshape(-1)


def _block_level(g: FlexGeometry, region_mask: Tensor,
                 slot_valid: Tensor) -> Tuple[Tensor, Tensor]:
    """``(any, full)`` ``(N, QB, KB)`` bool from the padded ``(N, R', R')``
    region mask: blocks with some routed pair, and blocks where every
    pair is routed and every key slot valid."""
    n = region_mask.shape[0]
    if g.slots <= g.block:
        per = g.block // g.slots
        nb = g.padded_regions // per
        pairs = region_mask.view(n, nb, per, nb, per)
        any_, all_ = pairs.any(4).any(2), pairs.all(4).all(2)
    else:
        span = g.slots // g.block
        any_ = region_mask.repeat_interleave(span, 1)
        any_ = any_.repeat_interleave(span, 2)
        all_ = any_
    keys_ok = slot_valid.view(g.blocks, g.block).all(1)
    return any_, all_ & keys_ok.view(1, 1, -1)


def _as_kv_blocks(blocks: Tensor) -> Tuple[Tensor, Tensor]:
    """``(N, QB, KB)`` bool -> BlockMask's ``(N, 1, QB)`` counts and
    ``(N, 1, QB, KB)`` indices (the selected blocks first, ascending)."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True,
                          stable=True)
    return counts.unsqueeze(1), order.to(torch.int32).unsqueeze(1)


def block_mask(graph: RegionGraph, hw: Tuple[int, int],
               block: Optional[int] = None):
    """FlexAttention's ``BlockMask`` of ``graph`` over an ``hw`` map in the
    region-major layout of :func:`flex_geometry`, and that geometry."""
    from torch.nn.attention.flex_attention import BlockMask
    g = flex_geometry(hw, graph.n_win, block)
    dev = graph.topk_index.device
    routed = graph.dense_region_mask()
    pad = g.padded_regions - g.regions
    if pad:
        routed = F.pad(routed, (0, pad, 0, pad))
    valid = _slot_valid(g, hw, graph.n_win, graph.key_valid, dev)
    any_, full = _block_level(g, routed, valid)
    partial = any_ & ~full
    slots = g.slots

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // slots, kv_idx // slots] & valid[kv_idx]

    return BlockMask.from_kv_blocks(
        *_as_kv_blocks(partial), *_as_kv_blocks(full), BLOCK_SIZE=g.block,
        mask_mod=mask_mod, seq_lengths=(g.length, g.length)), g


def block_stats(graph: RegionGraph, hw: Tuple[int, int],
                block: Optional[int] = None) -> dict:
    """What FlexAttention computes for ``graph`` on an ``hw`` map: token
    pairs in computed blocks against the routed pairs BRA needs.

    Returns a dict with ``tokens`` (T), ``slots`` (T'), ``block``,
    ``regions_per_block`` (below 1 where a region spans blocks),
    ``sequence`` (``R' * T'`` against ``L``),
    ``routed_pairs`` and ``computed_pairs`` per image and head (means over
    the batch), ``inflation`` (their ratio), ``full_blocks`` (share of the
    computed blocks that need no ``mask_mod``) and ``density`` (computed
    pairs over ``L'**2``).
    """
    g = flex_geometry(hw, graph.n_win, block)
    routed = graph.dense_region_mask()
    pad = g.padded_regions - g.regions
    if pad:
        routed = F.pad(routed, (0, pad, 0, pad))
    valid = _slot_valid(g, hw, graph.n_win, graph.key_valid,
                        graph.topk_index.device)
    any_, full = _block_level(g, routed, valid)
    computed = any_.sum((1, 2)).double().mean().item() * g.block ** 2
    need = graph.topk * g.regions * g.tokens ** 2
    return dict(tokens=g.tokens, slots=g.slots, block=g.block,
                regions_per_block=g.block / g.slots,
                sequence=(g.length, g.regions * g.tokens),
                routed_pairs=need, computed_pairs=computed,
                inflation=computed / need,
                full_blocks=(full.sum() / any_.sum().clamp_min(1)).item(),
                density=computed / g.length ** 2)


def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    if not COMPILE or torch.compiler.is_compiling():
        return flex_attention
    if device.type == 'cpu' and \
            torch.backends.cpu.get_cpu_capability() != 'AVX512':
        # below AVX-512 the CPU kernel inductor generates for it fails
        # ('index out of bounds', torch 2.14): the uncompiled one there
        return flex_attention
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def forward(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph, heads: int,
            scale: float, block: Optional[int] = None) -> Tensor:
    """BRA's token attention through FlexAttention.

    ``q``, ``k``: ``(N, H, W, heads * d)``; ``v``: ``(N, H, W, heads *
    dv)``; returns ``(N, H, W, heads * dv)``. A query whose routed keys are
    all invalid gets zeros (FlexAttention's convention), not NaN.
    """
    hw = (q.shape[1], q.shape[2])
    mask, g = block_mask(graph, hw, block)
    nw = graph.n_win

    def seq(t: Tensor) -> Tensor:  # (N, heads, R' * T', c)
        t = rearrange(t, 'n (j y) (i x) (m c) -> n m (j i) (y x) c', j=nw,
                      i=nw, m=heads)
        t = F.pad(t, (0, 0, 0, g.slots - g.tokens, 0,
                      g.padded_regions - g.regions))
        return t.reshape(t.shape[0], heads, g.length, t.shape[-1])

    out = _flex(q.device)(seq(q), seq(k), seq(v), block_mask=mask,
                          scale=scale)
    out = out.view(out.shape[0], heads, g.padded_regions, g.slots, -1)
    out = out[:, :, :g.regions, :g.tokens]
    return rearrange(out, 'n m (j i) (y x) c -> n (j y) (i x) (m c)', j=nw,
                     i=nw, y=hw[0] // nw).contiguous()
