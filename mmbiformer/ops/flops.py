"""FLOP counts of BRA for FLOP counters (fvcore / mmengine ``FlopAnalyzer``).

The counters trace the model with the JIT and count ``aten::matmul`` etc.
The ``reference``, ``official`` and ``gather`` backends and the routing step
are made of ``aten::matmul`` calls that are counted automatically (the
``reference`` backend computes dense attention, so it counts more). The
``fused`` and ``triton`` backends are custom autograd functions that appear
in the trace as single nodes named

* ``prim::PythonOp.BRAFusedAttention`` (``fused``)
* ``prim::PythonOp.BRATokenDenseAttention`` (``fused``, dense mode in
  token order)
* ``prim::PythonOp.BRATritonAttention`` (``triton``)
* ``prim::PythonOp.BRACpuAttention`` (``cpu``, token order; the module
  itself only takes this path outside JIT tracing)

Register :func:`bra_flop_jit` as the handle for both so that every backend
reports the same FLOPs as the official implementation, e.g.::

    analyzer.set_op_handle(*{name: bra_flop_jit
                             for name in BRA_JIT_OP_NAMES}.items())

Counts follow fvcore's convention: one multiply-add is one FLOP.
"""
from __future__ import annotations

from typing import Any, List

__all__ = ['BRA_JIT_OP_NAMES', 'bra_attention_flops', 'bra_flop_jit',
           'bra_routing_flops']

BRA_JIT_OP_NAMES = ('prim::PythonOp.BRAFusedAttention',
                    'prim::PythonOp.BRATokenDenseAttention',
                    'prim::PythonOp.BRATritonAttention',
                    'prim::PythonOp.BRACpuAttention')


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
    """FLOP-counter handle for the BRA custom autograd functions.

    ``inputs`` are the JIT values of ``apply(q, k, v, topk_index, ...)``:
    q ``(B, h, R, Tq, d)``, k ``(B, h, S, Tk, d)``, v ``(B, h, S, Tk, dv)``,
    topk_index ``(B, R, K)``; or, token order (self-attention, ``S = R``),
    q ``(B, h, L, d)``, k ``(B, h, L, d)``, v ``(B, h, L, dv)``.
    """
    q, k, v, idx = (_sizes(x) for x in inputs[:4])
    if len(q) == 4:
        b, h, lq, d = q
        r = idx[1]
        return bra_attention_flops(b, h, r, lq // r, k[2] // r, idx[2], d,
                                   v[3])
    b, h, r, tq, d = q
    return bra_attention_flops(b, h, r, tq, k[3], idx[2], d, v[4])
