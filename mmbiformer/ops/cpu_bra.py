"""The C++ CPU implementation of the BRA operator (float32).

The kernels (``csrc/cpu_kernels.cpp``, built by :mod:`~.cpu_ext`) read q, k
and v where they lie (views of the ``qkv`` projection, ``(N, H, W, C)``;
routed rows through pointers, small transposed or grouped copies of the
routed keys) and write the output in the map's token order: no
region-major copies and no top-k copies of K/V, the exact routed FLOPs. The
forward keeps only the per-query log-sum-exp; the backward recomputes the
probabilities per region (taking ``dO . o`` as ``sum_j P_ij dP_ij``) and
accumulates dK/dV per (image, head).

:func:`mmbiformer.ops.bra` takes them by default at the AVX-512 and AVX2
capability levels, where they were measured faster than the portable code
(``docs/benchmarks.md``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cpu_ext

__all__ = ['applies', 'backward', 'forward']


def applies(q: Tensor, v: Tensor, heads: int,
            key_valid: Optional[Tensor]) -> Optional[str]:
    """``None`` where the kernels take these inputs, else why not."""
    if q.dtype != torch.float32 or v.dtype != torch.float32:
        return f'they take float32, not {q.dtype}'
    if (q.shape[-1] // heads) % 16 or (v.shape[-1] // heads) % 16:
        return 'they take head dims that are multiples of 16'
    if key_valid is not None:
        return "they take no key mask (pad_mode='masked')"
    if cpu_ext.load() is None:
        return 'they could not be built on this machine (see ' \
            '`python -m mmbiformer.ops.cpu_ext`)'
    return None


def _rows(t: Tensor, heads: int) -> Tensor:
    """``(N, H, W, heads * c)`` -> ``(N, L, heads, c)`` with a unit last
    stride (a view of a ``qkv`` slice, a copy of other layouts)."""
    n, h, w, c = t.shape
    t = t.reshape(n, h * w, heads, c // heads)
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
            key_valid: Optional[Tensor], n_win: int, heads: int,
            scale: float) -> Tuple[Tensor, Tensor]:
    n, h, w, _ = q.shape
    out, lse = cpu_ext.load().bra_forward(
        _rows(q, heads), _rows(k, heads), _rows(v, heads),
        topk_index.contiguous(), h, w, n_win, scale, True)
    return out.view(n, h, w, -1), lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             lse: Tensor, topk_index: Tensor, key_valid: Optional[Tensor],
             n_win: int, heads: int, scale: float
             ) -> Tuple[Tensor, Tensor, Tensor]:
    n, h, w, _ = q.shape
    grads = [torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v)]
    cpu_ext.load().bra_backward(
        _rows(grad_out, heads), _rows(q, heads), _rows(k, heads),
        _rows(v, heads), lse.contiguous(), topk_index.contiguous(), h, w,
        n_win, scale, *(_rows(g, heads) for g in grads))
    return tuple(grads)
