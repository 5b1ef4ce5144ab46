"""Parameter and FLOP counts of models containing BiFormer.

FLOPs are counted the fvcore way with ``mmengine.analysis.FlopAnalyzer``
(a JIT trace; one multiply-add is one FLOP). The routing attention's custom
autograd functions (``fused``, ``triton`` backends) appear in the trace as
single ``prim::PythonOp`` nodes, which the counter would skip: they get the
handle of :mod:`mmbiformer.ops.flops`; the last stage's
``aten::scaled_dot_product_attention`` gets :func:`sdpa_flop_jit`. The
``reference`` backend (the dense, masked oracle) would be counted at its
dense cost and ``flex`` (a compiled FlexAttention) cannot be traced, so
during the count the routing attentions that use them run with
``official`` instead (the same function). The counts are therefore
identical for every backend.

BatchNorm: the published BiFormer counts (2.23 / 4.49 / 9.80 G for tiny /
small / base at 224) equal fvcore's count with BatchNorm counted as for a
model in training mode (5 FLOPs per element); counted as in eval mode (2
per element) they are 2.228 / 4.487 / 9.795 G. :func:`flop_analysis` uses
the former by default (``bn_convention``).
"""
import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple, Union

import torch
import torch.nn as nn

from ..ops import BRA_JIT_OP_NAMES, BiLevelRoutingAttention, bra_flop_jit

SDPA_OP = 'aten::scaled_dot_product_attention'

#: backends counted through another one (same function, sparse cost)
_COUNT_AS = {'reference': 'official', 'flex': 'official'}


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOP-counter handle for ``aten::scaled_dot_product_attention``.

    q ``(..., L, d)``, k ``(..., S, d)``, v ``(..., S, dv)``: counted as the
    two matmuls ``q @ k^T`` and ``attn @ v`` of the explicit computation
    (``L * S * (d + dv)`` multiply-adds per leading index).
    """
    q, k, v = (list(x.type().sizes()) for x in inputs[:3])
    lead = math.prod(q[:-2])
    return lead * q[-2] * k[-2] * (q[-1] + v[-1])


def biformer_flop_handles() -> Dict[str, Callable]:
    """FLOP-counter handles for the ops BiFormer uses that fvcore's and
    mmengine's defaults skip: the routing attention's fused autograd
    functions and the last stage's fused scaled dot-product attention."""
    handles = {name: bra_flop_jit for name in BRA_JIT_OP_NAMES}
    handles[SDPA_OP] = sdpa_flop_jit
    return handles


@contextmanager
def countable_backends(model: nn.Module) -> Iterator[None]:
    """Temporarily switch routing attentions from backends whose trace
    would not reflect the sparse cost (``reference``) to ``official``."""
    changed = []
    for m in model.modules():
        if isinstance(m, BiLevelRoutingAttention) and m.backend in _COUNT_AS:
            changed.append((m, m.backend))
            m.backend = _COUNT_AS[m.backend]
    try:
        yield
    finally:
        for m, backend in changed:
            m.backend = backend


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded, as the official count)."""
    return sum(p.numel() for p in model.parameters())


def flop_analysis(model: nn.Module,
                  inputs: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
                  bn_convention: str = 'official'
                  ) -> Tuple[int, Dict[str, int]]:
    """Total FLOPs and FLOPs by module name of ``model(*inputs)``.

    The model is traced in eval mode (deterministic, no side effects).

    Args:
        model: Any module (a bare backbone, an mmpretrain classifier, a
            detector or segmentor in ``'tensor'`` mode ...).
        inputs: The forward inputs, e.g. a (1, 3, 224, 224) tensor.
        bn_convention: How ``aten::batch_norm`` is counted.
            ``'official'``: as fvcore counts it for a model in training
            mode (5 FLOPs per element with affine parameters); this is the
            convention of the published BiFormer counts (tiny/small/base
            2.23/4.49/9.80 G at 224). ``'eval'``: fvcore's inference count
            (2 per element; gives 2.228/4.487/9.795 G). Every other op is
            counted the same way in both.

    Returns:
        tuple: ``(total, by_module)`` where ``by_module`` maps every module
        name (``''`` is the whole model) to its FLOPs.
    """
    from mmengine.analysis import FlopAnalyzer
    from mmengine.analysis.jit_handles import norm_flop_counter

    if bn_convention not in ('official', 'eval'):
        raise ValueError(f"bn_convention must be 'official' or 'eval', got "
                         f'{bn_convention!r}')
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs, )
    was_training = model.training
    model.eval()
    try:
        with countable_backends(model), torch.no_grad():
            analyzer = FlopAnalyzer(model, inputs)
            analyzer.set_op_handle(**biformer_flop_handles())
            if bn_convention == 'official':
                # the training-mode count: input numel * (5 if affine else 4)
                analyzer.set_op_handle('aten::batch_norm',
                                       norm_flop_counter(1))
            analyzer.unsupported_ops_warnings(False)
            analyzer.uncalled_modules_warnings(False)
            analyzer.tracer_warnings('none')
            by_module = dict(analyzer.by_module())
            total = analyzer.total()
    finally:
        model.train(was_training)
    return total, by_module
