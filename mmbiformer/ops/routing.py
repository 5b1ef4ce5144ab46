"""Region-level routing: the first level of bi-level routing attention.

Layouts used throughout :mod:`mmbiformer.ops`:

* ``B`` batch, ``R`` query regions, ``S`` key/value regions (``S == R`` in
  BiFormer), ``T`` tokens per region, ``C`` channels.
* Region features are ``(B, R, C)``; per-region token tensors are
  ``(B, R, T, C)`` (tokens row-major inside a region, regions row-major in
  the region grid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['RegionGraph', 'region_mean', 'route']


@dataclass(frozen=True)
class RegionGraph:
    """Which key regions every query region attends to.

    A small, reusable description of the block-sparse attention pattern of
    BRA (analogous to a ``BlockMask`` of ``flex_attention``): query region
    ``r`` of batch item ``b`` attends to all tokens of key regions
    ``topk_index[b, r, :]``.

    Attributes:
        topk_index: ``(B, R, topk)`` int64; indices into the ``S`` key
            regions. Indices in one row must be distinct (``torch.topk``
            guarantees that).
        num_kv_regions: ``S``, the number of key/value regions.
        key_mask: optional ``(B, S, Tk)`` bool, ``True`` for key tokens that
            take part in attention (``False`` e.g. for padding). A query
            whose routed keys are all masked gets an undefined (NaN) output.
        routing_logits: optional ``(B, R, S)`` region-to-region scores the
            graph was built from (kept for visualisation only).
    """

    topk_index: Tensor
    num_kv_regions: int
    key_mask: Optional[Tensor] = None
    routing_logits: Optional[Tensor] = None

    def __post_init__(self) -> None:
        idx = self.topk_index
        if idx.dim() != 3:
            raise ValueError(
                'RegionGraph.topk_index must be (B, R, topk), got shape '
                f'{tuple(idx.shape)}')
        if idx.dtype != torch.long:
            raise ValueError('RegionGraph.topk_index must be int64 (long), '
                             f'got {idx.dtype}; use .long()')
        if self.topk > self.num_kv_regions:
            raise ValueError(
                f'topk={self.topk} is larger than the number of key regions '
                f'({self.num_kv_regions}); use topk <= {self.num_kv_regions}')
        if self.key_mask is not None:
            km = self.key_mask
            if (km.dim() != 3 or km.dtype != torch.bool
                    or km.shape[0] != idx.shape[0]
                    or km.shape[1] != self.num_kv_regions):
                raise ValueError(
                    'RegionGraph.key_mask must be a bool tensor of shape '
                    f'(B={idx.shape[0]}, S={self.num_kv_regions}, Tk), got '
                    f'{km.dtype} {tuple(km.shape)}')

    @property
    def batch(self) -> int:
        return self.topk_index.shape[0]

    @property
    def num_regions(self) -> int:
        return self.topk_index.shape[1]

    @property
    def topk(self) -> int:
        return self.topk_index.shape[2]

    def dense_region_mask(self) -> Tensor:
        """``(B, R, S)`` bool: ``True`` where region r attends region s."""
        mask = torch.zeros(self.batch, self.num_regions, self.num_kv_regions,
                           dtype=torch.bool, device=self.topk_index.device)
        return mask.scatter_(-1, self.topk_index, True)

    def flat_index(self, heads: int, start: int = 0,
                   end: Optional[int] = None) -> Tensor:
        """Row indices into a ``(B*heads*S, ...)`` flattened key tensor.

        Returns ``(B, heads, end-start, topk)`` int64 so that
        ``k.reshape(B*heads*S, Tk, d).index_select(0, idx.flatten())`` gives
        the routed key blocks of query regions ``start:end`` for every head.
        """
        idx = self.topk_index[:, start:end]
        b, r, k = idx.shape
        s = self.num_kv_regions
        base = torch.arange(b * heads, device=idx.device).view(b, heads, 1, 1)
        return base * s + idx.view(b, 1, r, k)  # (k, not -1: b may be 0)


def region_mean(x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over the tokens of each region.

    Args:
        x: ``(B, R, T, C)``.
        token_mask: optional ``(B or 1, R, T)`` bool; only ``True`` tokens
            are averaged (an all-``False`` region gives zeros).

    Returns:
        ``(B, R, C)``.
    """
    if token_mask is None:
        return x.mean(dim=2)
    w = token_mask.to(x.dtype).unsqueeze(-1)
    count = w.sum(dim=2).clamp_min(1.0)
    return (x * w).sum(dim=2) / count


def route(q_region: Tensor, k_region: Tensor, topk: int, scale: float,
          kv_region_valid: Optional[Tensor] = None
          ) -> Tuple[Tensor, Tensor]:
    """Region-to-region routing (one routing shared by all heads).

    ``logits = (q_region * scale) @ k_region^T`` and the ``topk`` highest
    scoring key regions per query region. Inputs are detached, as in
    BiFormer; the softmax of the logits is not used by the attention.

    Args:
        q_region: ``(B, R, C)`` region queries (e.g. token means).
        k_region: ``(B, S, C)`` region keys.
        topk: number of key regions per query region, ``1 <= topk <= S``.
        scale: logit scale.
        kv_region_valid: optional ``(B or 1, S)`` bool; key regions marked
            ``False`` get ``-inf`` logits so they are routed to last.

    Returns:
        ``(logits (B, R, S), topk_index (B, R, topk) int64)``.
    """
    s = k_region.shape[1]
    if not 1 <= topk <= s:
        raise ValueError(
            f'topk={topk} is impossible with {s} key regions (n_win**2); '
            f'use 1 <= topk <= {s} or a larger n_win')
    logits = (q_region.detach() * scale) @ k_region.detach().transpose(-2,
                                                                       -1)
    if kv_region_valid is not None:
        logits = logits.masked_fill(~kv_region_valid.unsqueeze(-2),
                                    float('-inf'))
    _, index = torch.topk(logits, k=topk, dim=-1)
    return logits, index
