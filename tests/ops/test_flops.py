"""FLOP counting: every backend reports the official FLOPs under tracing."""
import warnings

import pytest
import torch

from mmbiformer.ops import (
    BRA_JIT_OP_NAMES,
    BiLevelRoutingAttention,
    bra_attention_flops,
    bra_flop_jit,
    bra_routing_flops,
)


def traced_matmul_flops(module, x):
    """Count like fvcore: aten::matmul MACs plus the BRA op handles."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        graph = torch.jit.trace(module, (x, ), check_trace=False).graph
    total = 0
    for node in graph.nodes():
        kind = node.kind()
        if kind == 'prim::PythonOp':
            kind = f'{kind}.{node.pyname()}'
        if kind == 'aten::matmul':
            a, b = (list(i.type().sizes()) for i in list(node.inputs())[:2])
            n = 1
            for s in a:
                n *= s
            total += n * b[-1]
        elif kind in BRA_JIT_OP_NAMES:
            total += bra_flop_jit(list(node.inputs()), list(node.outputs()))
        elif kind.startswith('prim::PythonOp'):
            raise AssertionError(f'unexpected custom op {kind}')
    return total


@pytest.mark.parametrize('backend', ['torch', 'auto'])
def test_backends_count_official_flops(backend):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(32, num_heads=4, n_win=3, topk=2,
                                auto_pad=True, backend='official').eval()
    x = torch.randn(2, 7, 8, 32)
    official = traced_matmul_flops(m, x)
    m.backend = backend
    assert traced_matmul_flops(m, x) == official
    # official: routing (B,R,C)x(B,C,R) + q@k^T + attn@v
    b, r, t, topk, c, heads = 2, 9, 9, 2, 32, 4
    expected = bra_routing_flops(b, r, c) + bra_attention_flops(
        b, heads, r, t, t, topk, c // heads, c // heads)
    assert official == expected


def test_flop_formula():
    assert bra_attention_flops(1, 1, 1, 1, 1, 1, 1, 1) == 2
    assert bra_attention_flops(2, 3, 4, 5, 6, 7, 8, 9) == \
        2 * 3 * 4 * 5 * 6 * 7 * (8 + 9)
