"""Bi-level routing attention (BRA); needs only torch and einops (triton
lazily).

* :class:`BiLevelRoutingAttention`: the BiFormer attention layer
  (parameters ``qkv.qkv``, ``wo``, ``lepe`` as in official checkpoints).
* :func:`bra`: the token attention as one registered operator
  (``torch.ops.mmbiformer.bra_forward``), backends ``auto``, ``cpu``,
  ``triton``, ``torch``, ``official`` and ``reference``.
* :func:`region_graph`, :class:`RegionGraph`, :func:`route`: the region
  routing level and the routing object :func:`bra` takes.
* :mod:`mmbiformer.ops.flops`: FLOP counts and a FLOP-counter handle.
"""
from .bra import BACKENDS, bra, implementation, triton_available
from .flops import (
    BRA_JIT_OP_NAMES,
    bra_attention_flops,
    bra_flop_jit,
    bra_routing_flops,
)
from .module import BiLevelRoutingAttention
from .routing import RegionGraph, region_graph, region_means, route

__all__ = [
    'BACKENDS', 'BRA_JIT_OP_NAMES', 'BiLevelRoutingAttention', 'RegionGraph',
    'bra', 'bra_attention_flops', 'bra_flop_jit', 'bra_routing_flops',
    'implementation', 'region_graph', 'region_means', 'route',
    'triton_available'
]
