"""Functional core of bi-level routing attention (token-to-token level).

All backends compute the same function. With ``B`` batch, ``h`` heads,
``R`` query regions, ``S`` key/value regions, ``Tq``/``Tk`` tokens per
query/key region, ``d``/``dv`` head dims and ``K = topk``:

* ``q``: ``(B, h, R, Tq, d)``
* ``k``: ``(B, h, S, Tk, d)``
* ``v``: ``(B, h, S, Tk, dv)``
* ``topk_index``: ``(B, R, K)`` int64 (or a :class:`RegionGraph`)
* ``key_mask``: optional ``(B, S, Tk)`` bool, ``True`` = valid key token
* returns ``(B, h, R, Tq, dv)``

For query token ``t`` of region ``r``: the keys are the concatenation of the
tokens of regions ``topk_index[b, r, :]``; ``out = softmax((q*scale) @ k^T)
@ v`` with the softmax over all ``K*Tk`` keys.

Backends:

* ``'reference'``: dense attention over all ``S*Tk`` keys with a boolean
  mask built from the region graph. O((R*Tq) * (S*Tk)) memory: the oracle.
* ``'official'``: the original BiFormer algorithm: ``expand`` the key/value
  regions to ``(B, h, R, S, Tk, .)`` and ``torch.gather`` the routed ones,
  then matmul/softmax/matmul. Its backward allocates a zero gradient as
  large as the expanded tensor. Kept as the benchmark baseline.
* ``'gather'``: the same matmul/softmax/matmul, but the routed blocks are
  taken with ``index_select`` on a flattened ``(B*h*S, Tk, d)`` view, so the
  backward only accumulates into a gradient the size of ``k``/``v``.
* ``'fused'``: never holds the top-k copies of all regions at once (see
  :mod:`mmbiformer.ops.fused_cpu`); custom autograd function
  ``BRAFusedAttention``.
* ``'triton'``: a Triton kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``)
  custom autograd function ``BRATritonAttention``.
* ``'cpu'``: the project's C++ CPU kernels (see :mod:`mmbiformer.ops.cpu_bra`
  ); custom autograd function ``BRACpuAttention``. float32, head dims that
  are multiples of 16, ``S == R`` a square number, no key mask; other inputs
  (or a machine where the kernels cannot be built) run the ``'fused'``
  backend.
* ``'auto'``: see :func:`select_backend`.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import RegionGraph

__all__ = ['BACKENDS', 'bra_attention', 'select_backend',
           'triton_available']

BACKENDS = ('reference', 'official', 'gather', 'fused', 'triton', 'cpu',
            'auto')


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Whether the Triton backend can run on ``device``.

    On CUDA it needs an importable ``triton``; on the CPU it additionally
    needs ``TRITON_INTERPRET=1`` in the environment (set before ``triton`` is
    first imported).
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and torch.device(device).type == 'cuda':
        return True
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def select_backend(q: Tensor) -> str:
    """The backend ``'auto'`` resolves to for a query tensor.

    * CUDA: ``'triton'`` if Triton is importable and the head dims are
      supported by the kernel, else ``'fused'``.
    * CPU: ``'cpu'`` (the C++ kernels) for float32 inputs whose head dim is
      a multiple of 16 where the kernels can be built, the fastest backend
      at every BiFormer stage shape (see ``docs/benchmarks.md``); otherwise
      ``'fused'``, the least memory of the torch-only backends.

    ``q``'s last dim must be the head dim; the choice assumes values of the
    same head dim. (The ``'cpu'`` backend checks the values' head dim,
    ``S == R`` and the key mask itself and runs ``'fused'`` where they
    fail.)
    """
    if q.device.type == 'cuda' and triton_available(q.device):
        from .triton_bra import supports
        if supports(q):
            return 'triton'
    if q.device.type == 'cpu':
        from .cpu_bra import cpu_backend_applies
        if cpu_backend_applies(q, q, q.shape[-1], q.shape[-1]):
            return 'cpu'
    return 'fused'


def _as_graph(graph: Union[RegionGraph, Tensor], num_kv_regions: int,
              key_mask: Optional[Tensor]) -> RegionGraph:
    if isinstance(graph, RegionGraph):
        if key_mask is not None and graph.key_mask is not None:
            raise ValueError('key_mask was given twice: in the RegionGraph '
                             'and as an argument; pass it once')
        if key_mask is not None:
            graph = RegionGraph(graph.topk_index, graph.num_kv_regions,
                                key_mask, graph.routing_logits)
        if graph.num_kv_regions != num_kv_regions:
            raise ValueError(
                f'RegionGraph.num_kv_regions={graph.num_kv_regions} does not '
                f'match k.shape[2]={num_kv_regions}')
        return graph
    if not isinstance(graph, Tensor):
        raise TypeError('topk_index must be a RegionGraph or a (B, R, topk) '
                        f'int64 tensor, got {type(graph).__name__}')
    return RegionGraph(graph, num_kv_regions, key_mask)


def _check(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph) -> None:
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(
            'q, k, v must be 5-D: q (B, h, R, Tq, d), k (B, h, S, Tk, d), v '
            f'(B, h, S, Tk, dv); got {tuple(q.shape)}, {tuple(k.shape)}, '
            f'{tuple(v.shape)}')
    b, h, r, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:4] != k.shape[:4] or \
            k.shape[-1] != d:
        raise ValueError(
            'inconsistent shapes: q (B, h, R, Tq, d), k (B, h, S, Tk, d), v '
            f'(B, h, S, Tk, dv); got {tuple(q.shape)}, {tuple(k.shape)}, '
            f'{tuple(v.shape)}')
    if graph.topk_index.shape[:2] != (b, r):
        raise ValueError(
            f'topk_index must be (B={b}, R={r}, topk), got '
            f'{tuple(graph.topk_index.shape)}')
    if graph.key_mask is not None and graph.key_mask.shape[2] != k.shape[3]:
        raise ValueError(
            f'key_mask must be (B, S, Tk={k.shape[3]}), got '
            f'{tuple(graph.key_mask.shape)}')
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f'q, k, v dtypes differ: {q.dtype}, {k.dtype}, '
                         f'{v.dtype}')


def bra_attention(q: Tensor, k: Tensor, v: Tensor,
                  topk_index: Union[RegionGraph, Tensor],
                  scale: Optional[float] = None, backend: str = 'auto',
                  key_mask: Optional[Tensor] = None) -> Tensor:
    """Token-to-token attention restricted to routed regions.

    Args:
        q: ``(B, h, R, Tq, d)`` queries grouped by region.
        k: ``(B, h, S, Tk, d)`` keys grouped by region.
        v: ``(B, h, S, Tk, dv)`` values grouped by region.
        topk_index: ``(B, R, K)`` int64 key-region indices per query region
            (distinct within a row), or a :class:`RegionGraph`.
        scale: logit scale; ``None`` means ``d ** -0.5``. (BiFormer uses
            ``qk_dim ** -0.5`` over *all* heads; the module passes it.)
        backend: one of :data:`BACKENDS`.
        key_mask: optional ``(B, S, Tk)`` bool, ``True`` for valid keys.

    Returns:
        ``(B, h, R, Tq, dv)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f'backend={backend!r} is not supported; choose one '
                         f'of {BACKENDS}')
    graph = _as_graph(topk_index, k.shape[2], key_mask)
    _check(q, k, v, graph)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if backend == 'auto':
        backend = select_backend(q)
    if backend == 'reference':
        return _reference(q, k, v, graph, scale)
    if backend == 'official':
        return _official(q, k, v, graph, scale)
    if backend == 'gather':
        return _gather(q, k, v, graph, scale)
    if backend == 'cpu' and graph.key_mask is None:
        from .cpu_bra import cpu_attention
        out = cpu_attention(q, k, v, graph.topk_index, scale)
        if out is not None:
            return out
    if backend in ('fused', 'cpu'):
        from .fused_cpu import fused_attention
        return fused_attention(q, k, v, graph, scale)
    from .triton_bra import triton_attention
    return triton_attention(q, k, v, graph, scale)


def _masked_softmax(logits: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is not None:
        logits = logits.masked_fill(~mask, float('-inf'))
    return F.softmax(logits, dim=-1)


def _reference(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
               scale: float) -> Tensor:
    b, h, r, tq, d = q.shape
    s, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
    region = graph.dense_region_mask()  # (B, R, S)
    mask = region[:, :, None, :, None].expand(b, r, tq, s, tk)
    if graph.key_mask is not None:
        mask = mask & graph.key_mask[:, None, None]
    mask = mask.reshape(b, 1, r * tq, s * tk)
    logits = (q.reshape(b, h, r * tq, d) * scale) @ \
        k.reshape(b, h, s * tk, d).transpose(-2, -1)
    attn = _masked_softmax(logits, mask)
    out = attn @ v.reshape(b, h, s * tk, dv)
    return out.view(b, h, r, tq, dv)


def _official(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
              scale: float) -> Tensor:
    b, h, r = q.shape[:3]
    s, tk = k.shape[2], k.shape[3]
    idx = graph.topk_index
    topk = idx.shape[-1]

    def select(t: Tensor) -> Tensor:
        c = t.shape[-1]
        expanded = t.unsqueeze(2).expand(b, h, r, s, tk, c)
        index = idx.view(b, 1, r, topk, 1, 1).expand(b, h, r, topk, tk, c)
        return torch.gather(expanded, 3, index).reshape(b, h, r, topk * tk,
                                                        c)

    k_sel, v_sel = select(k), select(v)
    logits = (q * scale) @ k_sel.transpose(-2, -1)
    mask = None
    if graph.key_mask is not None:
        km = graph.key_mask.unsqueeze(1).expand(b, r, s, tk)
        mask = torch.gather(km, 2, idx.unsqueeze(-1).expand(b, r, topk, tk))
        mask = mask.reshape(b, 1, r, 1, topk * tk)
    attn = _masked_softmax(logits, mask)
    return attn @ v_sel


def gather_key_mask(graph: RegionGraph, start: int = 0,
                    end: Optional[int] = None) -> Optional[Tensor]:
    """Routed key mask of query regions ``start:end``: ``(B, Rc, K*Tk)``."""
    if graph.key_mask is None:
        return None
    km = graph.key_mask
    b, s, tk = km.shape
    idx = graph.topk_index[:, start:end]
    flat = torch.arange(b, device=idx.device).view(b, 1, 1) * s + idx
    sel = km.reshape(b * s, tk).index_select(0, flat.reshape(-1))
    return sel.view(b, idx.shape[1], idx.shape[2] * tk)


def gather_blocks(t: Tensor, flat_index: Tensor) -> Tensor:
    """Routed blocks of ``t`` (B, h, S, Tk, c) -> (B, h, Rc, K*Tk, c)."""
    b, h, s, tk, c = t.shape
    _, _, rc, topk = flat_index.shape
    sel = t.reshape(b * h * s, tk, c).index_select(0, flat_index.reshape(-1))
    return sel.view(b, h, rc, topk * tk, c)


def _gather(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
            scale: float) -> Tensor:
    h = q.shape[1]
    flat = graph.flat_index(h)
    k_sel, v_sel = gather_blocks(k, flat), gather_blocks(v, flat)
    logits = (q * scale) @ k_sel.transpose(-2, -1)
    mask = gather_key_mask(graph)
    if mask is not None:
        mask = mask[:, None, :, None, :]
    attn = _masked_softmax(logits, mask)
    return attn @ v_sel
