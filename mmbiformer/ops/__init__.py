"""Bi-level routing attention (BRA) ops; needs only torch and einops.

* :class:`BiLevelRoutingAttention`: the BiFormer attention layer
  (parameters ``qkv.qkv``, ``wo``, ``lepe`` as in official checkpoints).
* :func:`bra_attention`: the functional core (token attention over routed
  regions) with backends ``reference``, ``official``, ``gather``, ``fused``,
  ``triton``, ``cpu`` (C++ kernels, :mod:`mmbiformer.ops.cpu_bra`) and
  ``auto``.
* :func:`route`, :func:`region_mean`, :class:`RegionGraph`: the region
  routing level and the reusable region graph.
* :mod:`mmbiformer.ops.flops`: FLOP counts and a FLOP-counter handle.
"""
from .flops import (
    BRA_JIT_OP_NAMES,
    bra_attention_flops,
    bra_flop_jit,
    bra_routing_flops,
)
from .functional import (
    BACKENDS,
    bra_attention,
    select_backend,
    triton_available,
)
from .module import BiLevelRoutingAttention
from .routing import RegionGraph, region_mean, route

__all__ = [
    'BACKENDS', 'BRA_JIT_OP_NAMES', 'BiLevelRoutingAttention', 'RegionGraph',
    'bra_attention', 'bra_attention_flops', 'bra_flop_jit',
    'bra_routing_flops', 'region_mean', 'route', 'select_backend',
    'triton_available'
]
