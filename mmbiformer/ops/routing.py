"""Region-level routing: the first level of bi-level routing attention.

A feature map ``(N, H, W, C)`` (channels last; ``H`` and ``W`` multiples of
``n_win``) is cut into ``R = n_win ** 2`` regions of ``rh x rw`` tokens,
numbered row-major over the region grid. Every region keeps the ``topk``
regions whose mean key best matches its mean query; the
:class:`RegionGraph` holds that choice, and :func:`mmbiformer.ops.bra`
runs the token attention it allows (as ``flex_attention`` takes a
``BlockMask``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['RegionGraph', 'floor_region_grid', 'region_graph',
           'region_means', 'route']


@dataclass(frozen=True)
class RegionGraph:
    """Which regions the tokens of every region attend to.

    Attributes:
        topk_index: ``(N, R, topk)`` int64, the key regions of each query
            region (distinct within a row, as ``torch.topk`` gives them).
        n_win: regions per side of the grid, ``R = n_win ** 2``.
        key_valid: optional ``(H, W)`` bool, ``False`` for tokens that are
            no keys (the padding of ``pad_mode='masked'``); they take no
            part in the attention. A query whose routed keys are all
            invalid gets NaN.
        routing_logits: optional ``(N, R, R)`` region-to-region scores the
            graph was built from (for visualisation; not used by the
            attention).
    """

    topk_index: Tensor
    n_win: int
    key_valid: Optional[Tensor] = None
    routing_logits: Optional[Tensor] = None

    def __post_init__(self) -> None:
        idx = self.topk_index
        if idx.dim() != 3 or idx.dtype != torch.long:
            raise ValueError(
                'RegionGraph.topk_index must be an int64 (N, R, topk) '
                f'tensor, got {idx.dtype} of shape {tuple(idx.shape)}')
        if idx.shape[1] != self.n_win * self.n_win:
            raise ValueError(
                f'RegionGraph.topk_index has {idx.shape[1]} query regions, '
                f'n_win={self.n_win} makes {self.n_win ** 2}')
        if idx.shape[2] > idx.shape[1]:
            raise ValueError(
                f'topk={idx.shape[2]} is larger than the number of regions '
                f'({idx.shape[1]}); use topk <= {idx.shape[1]}')
        kv = self.key_valid
        if kv is not None and (kv.dim() != 2 or kv.dtype != torch.bool):
            raise ValueError('RegionGraph.key_valid must be a bool (H, W) '
                             f'tensor, got {kv.dtype} {tuple(kv.shape)}')

    @property
    def topk(self) -> int:
        return self.topk_index.shape[2]

    def region_hw(self, h: int, w: int) -> Tuple[int, int]:
        """Tokens per region, ``(rh, rw)``, of an ``h x w`` map."""
        return h // self.n_win, w // self.n_win

    def dense_region_mask(self) -> Tensor:
        """``(N, R, R)`` bool: ``True`` where region r attends region s."""
        idx = self.topk_index
        mask = idx.new_zeros(idx.shape[0], idx.shape[1], idx.shape[1],
                             dtype=torch.bool)
        return mask.scatter_(-1, idx, True)


def region_means(x: Tensor, n_win: int,
                 valid: Optional[Tensor] = None) -> Tensor:
    """Mean of each region's tokens: ``(N, H, W, C)`` -> ``(N, R, C)``.

    ``valid`` (``(H, W)`` bool) restricts the means to the valid tokens (a
    region without any gets zeros).
    """
    n, h, w, c = x.shape
    rh, rw = h // n_win, w // n_win
    regions = x.reshape(n, n_win, rh, n_win, rw, c)
    if valid is None:
        # two reductions, the inner one over adjacent rows of channels:
        # 4-12x faster on the CPU than one mean over both dims of these
        # strided views (slices of the qkv projection)
        sums = regions.sum(4).sum(2)
        return sums.reshape(n, n_win * n_win, c) / (rh * rw)
    weight = valid.to(x.dtype).reshape(1, n_win, rh, n_win, rw, 1)
    sums = (regions * weight).sum(4).sum(2)
    count = weight.sum(4).sum(2).clamp_min(1.0)
    return (sums / count).reshape(n, n_win * n_win, c)


def route(q_region: Tensor, k_region: Tensor, topk: int, scale: float,
          kv_region_valid: Optional[Tensor] = None
          ) -> Tuple[Tensor, Tensor]:
    """Region-to-region routing, one routing for all heads.

    ``logits = (q_region * scale) @ k_region^T`` and the ``topk`` best key
    regions of each query region. The inputs are detached, as in BiFormer.

    Args:
        q_region: ``(N, R, C)`` region queries.
        k_region: ``(N, S, C)`` region keys.
        topk: regions kept per query region, ``1 <= topk <= S``.
        scale: logit scale.
        kv_region_valid: optional ``(S,)`` or ``(N, S)`` bool; ``False``
            regions get ``-inf`` logits (routed to last).

    Returns:
        ``logits (N, R, S)`` and ``topk_index (N, R, topk)`` int64.
    """
    s = k_region.shape[1]
    if not 1 <= topk <= s:
        raise ValueError(
            f'topk={topk} is impossible with {s} regions (n_win**2); use '
            f'1 <= topk <= {s} or a larger n_win')
    logits = (q_region.detach() * scale) @ k_region.detach().transpose(-2,
                                                                       -1)
    if kv_region_valid is not None:
        logits = logits.masked_fill(~kv_region_valid.unsqueeze(-2),
                                    float('-inf'))
    _, index = torch.topk(logits, k=topk, dim=-1)
    return logits, index


def floor_region_grid(h: int, w: int, n_win: int) -> Tuple[int, int, int]:
    """The region grid of BiFormer-STL-nchw's rule for an ``h x w`` map.

    Regions are ``rh = h // n_win`` by ``rw = w // n_win`` tokens (at least
    one), and as many of them as cover the map: ``ceil(h / rh)`` by
    ``ceil(w / rw)``, which is ``n_win x n_win`` when ``n_win`` divides the
    sides and can be more (e.g. 8 x 10 regions of 2 x 2 tokens for a 15 x
    20 map and ``n_win=7``). The operator's grid is square, so the map is
    padded to ``g x g`` regions with ``g`` the larger count (at least
    ``n_win``); regions that hold padding only are never routed to when
    :func:`region_graph` gets the valid tokens.

    Returns:
        ``(rh, rw, g)``: the padded map is ``(g * rh, g * rw)``.
    """
    rh, rw = max(h // n_win, 1), max(w // n_win, 1)
    g = max(-(-h // rh), -(-w // rw), n_win)
    return rh, rw, g


def region_graph(q: Tensor, k: Tensor, n_win: int, topk: int, scale: float,
                 key_valid: Optional[Tensor] = None,
                 mask_keys: bool = True) -> RegionGraph:
    """The routing of BRA: region means of ``q`` and ``k`` (``(N, H, W,
    C)``), their affinities and the top-k regions of each region.

    ``key_valid`` (``(H, W)`` bool, ``False`` on padding) leaves invalid
    tokens out of the means and regions without a valid token out of the
    routing. With ``mask_keys`` (default) the graph keeps it, so the
    attention skips those keys as well (``pad_mode='masked'``). With
    ``mask_keys=False`` the padded tokens stay keys and enter the softmax
    with whatever ``k`` and ``v`` hold there: BiFormer-STL-nchw's rule,
    where the padding is zeros added after the projection
    (``pad_mode='after_qkv'``).
    """
    h, w = q.shape[1], q.shape[2]
    if h % n_win or w % n_win:
        raise ValueError(f'a {h}x{w} map is not divisible into n_win={n_win}'
                         ' regions per side; pad it to multiples of n_win')
    with torch.no_grad():
        q_win = region_means(q, n_win, key_valid)
        k_win = region_means(k, n_win, key_valid)
        region_valid = None
        if key_valid is not None:
            rh, rw = h // n_win, w // n_win
            region_valid = key_valid.view(n_win, rh, n_win, rw).any(3).any(1)
            region_valid = region_valid.reshape(-1)
        logits, index = route(q_win, k_win, topk, scale, region_valid)
    return RegionGraph(index, n_win, key_valid if mask_keys else None,
                       logits)
