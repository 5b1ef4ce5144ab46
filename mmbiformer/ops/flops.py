"""FLOP counts of BRA for FLOP counters (fvcore / mmengine ``FlopAnalyzer``).

The counters trace the model with the JIT and count ``aten::matmul`` etc.
The ``reference`` and ``official`` backends and the routing step are made
of such calls and are counted as they are (``reference`` computes dense
attention, so it counts more). The other backends run the registered
operator, one node of kind ``mmbiformer::bra_forward`` in the trace:
register :func:`bra_flop_jit` as its handle, e.g.::

    analyzer.set_op_handle(*{name: bra_flop_jit
                             for name in BRA_JIT_OP_NAMES}.items())

and every backend reports the FLOPs of the official implementation. Counts
follow fvcore's convention: one multiply-add is one FLOP.
"""
from __future__ import annotations

from typing import Any, List

__all__ = ['BRA_JIT_OP_NAMES', 'bra_attention_flops', 'bra_flop_jit',
           'bra_routing_flops']

BRA_JIT_OP_NAMES = ('mmbiformer::bra_forward', )


def bra_attention_flops(batch: int, heads: int, regions: int, q_tokens: int,
                        k_tokens_per_region: int, topk: int, head_dim: int,
                        v_head_dim: int) -> int:
    """Multiply-adds of one BRA token attention call.

    ``q @ k^T`` over ``topk * k_tokens_per_region`` keys plus ``attn @ v``,
    for every (batch, head, query region, query token); as fvcore counts the
    two ``aten::matmul`` calls of the official implementation.
    """
    keys = topk * k_tokens_per_region
    return batch * heads * regions * q_tokens * keys * (head_dim +
                                                        v_head_dim)


def bra_routing_flops(batch: int, regions: int, qk_dim: int) -> int:
    """Multiply-adds of the region routing ``(B, R, C) @ (B, C, R)``."""
    return batch * regions * regions * qk_dim


def _sizes(value: Any) -> List[int]:
    return list(value.type().sizes())


def bra_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOP-counter handle of ``mmbiformer::bra_forward``: ``inputs`` are
    the JIT values of ``(q, k, v, topk_index, ...)`` with q ``(N, H, W,
    heads * d)``, v ``(N, H, W, heads * dv)``, topk_index ``(N, R, K)``;
    ``outputs`` ``(out, lse (N, heads, L))``."""
    q, _, v, idx = (_sizes(x) for x in inputs[:4])
    n, h, w, cq = q
    heads = _sizes(outputs[1])[1]
    r, topk = idx[1], idx[2]
    tokens = h * w // r
    return bra_attention_flops(n, heads, r, tokens, tokens, topk,
                               cq // heads, v[3] // heads)
