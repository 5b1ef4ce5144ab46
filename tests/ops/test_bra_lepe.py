"""mmbiformer::bra_lepe: BRA and its LePE as one operator (C++ kernels)."""
import copy

import pytest
import torch

from mmbiformer.ops import bra_lepe as fused
from mmbiformer.ops import cpu_ext
from mmbiformer.ops.module import BiLevelRoutingAttention

needs_kernels = pytest.mark.skipif(not cpu_ext.available(),
                                   reason='the CPU kernels are not built here')


def _layers(dim=32, heads=2, topk=3, lepe=5, backend='auto'):
    torch.manual_seed(0)
    plain = BiLevelRoutingAttention(dim, heads, 7, topk=topk,
                                    side_dwconv=lepe, backend=backend)
    fast = copy.deepcopy(plain)
    fast.__class__ = fused.AcceleratedRoutingAttention
    return plain, fast


@pytest.fixture
def any_level(monkeypatch):
    # the operator where the kernels are built, whatever this CPU's level
    monkeypatch.setattr(fused, 'training_fusions', lambda x: True)


@needs_kernels
def test_opcheck(any_level):
    torch.manual_seed(0)
    qkv = torch.randn(2, 14, 14, 96, requires_grad=True)
    idx = torch.stack([torch.randperm(49)[:3] for _ in range(2 * 49)])
    weight = torch.randn(32, 1, 5, 5, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    torch.library.opcheck(fused.bra_lepe,
                          (qkv, idx.view(2, 49, 3), weight, bias, 7, 2, 32,
                           32**-0.5))


@needs_kernels
@pytest.mark.parametrize('size', [14, 28])
def test_equals_the_plain_layer(size, any_level):
    plain, fast = _layers()
    x = torch.randn(2, size, size, 32, requires_grad=True)
    assert fused.fused_applies(fast, x)
    g = torch.randn(2, size, size, 32)
    grads = []
    for layer in (plain, fast):
        y = layer(x)
        (dx, ) = torch.autograd.grad(y, x, g, retain_graph=True)
        y.backward(g)
        grads.append((y.detach(), dx, [p.grad for p in layer.parameters()]))
    (y0, dx0, p0), (y1, dx1, p1) = grads
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx1, dx0, atol=1e-5, rtol=1e-4)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_the_plain_layer_where_it_does_not_apply(any_level, monkeypatch):
    calls, op = [], fused.bra_lepe
    monkeypatch.setattr(fused, 'bra_lepe',
                        lambda *a: calls.append(1) or op(*a))
    x = torch.randn(1, 14, 14, 32)
    _, fast = _layers()
    assert not fused.fused_applies(fast, torch.randn(1, 15, 14, 32))
    assert not fused.fused_applies(fast, x.double())
    assert not fused.fused_applies(_layers(lepe=0)[1], x)
    assert not fused.fused_applies(_layers(backend='torch')[1], x)
    assert not fused.fused_applies(_layers(dim=16, heads=2)[1],
                                   torch.randn(1, 14, 14, 16))
    out, info = fast(x, return_routing=True)
    assert not calls and info['topk_index'].shape == (1, 49, 3)


def test_not_below_the_avx512_kernels(monkeypatch):
    monkeypatch.setattr(fused, 'training_fusions', lambda x: False)
    _, fast = _layers()
    assert not fused.fused_applies(fast, torch.randn(1, 14, 14, 32))
