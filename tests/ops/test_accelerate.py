"""swap_modules(): the swapped modules compute what nn.Linear and the GELU
MLP compute, keep the state dict and pass opcheck and a full-graph
compile."""
import copy

import pytest
import torch
import torch.nn as nn

from mmbiformer.ops import BiLevelRoutingAttention
from mmbiformer.ops.accelerate import (
    AcceleratedLinear,
    AcceleratedMlp,
    linear,
    linear_gelu,
    swap_modules,
)


@pytest.mark.parametrize('shape', [(7, 16), (2, 5, 3, 16)])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_op_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(16, 24, bias=bias)
    fast = copy.deepcopy(lin)
    assert swap_modules(fast) == 1
    assert isinstance(fast, nn.Linear) and type(fast) is AcceleratedLinear
    assert fast.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 24)
    params = [x] + list(lin.parameters())
    fast_params = [x] + list(fast.parameters())
    ref = torch.autograd.grad(lin(x), params, g)
    got = torch.autograd.grad(fast(x), fast_params, g)
    torch.testing.assert_close(fast(x), lin(x), atol=1e-5, rtol=1e-5)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('layout', ['compact', 'permuted'])
def test_opcheck(layout):
    x = torch.randn(2, 3, 4, 16)
    if layout == 'permuted':
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(linear, (x.requires_grad_(),
                                   torch.randn(8, 16, requires_grad=True),
                                   torch.randn(8, requires_grad=True)))


def test_accelerated_layer_compiles_and_equals_plain():
    torch.manual_seed(0)
    plain = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2,
                                    auto_pad=True)
    fast = copy.deepcopy(plain)
    assert swap_modules(fast) == 2  # qkv.qkv and wo
    x = torch.randn(2, 6, 7, 32)
    compiled = torch.compile(fast, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)


def _mlp(identity: bool) -> nn.Sequential:
    layers = [nn.Linear(16, 48)] + ([nn.Identity()] if identity else []) + \
        [nn.GELU(), nn.Linear(48, 16)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize('identity', [True, False])
def test_mlp_swap_fuses_gelu_in_inference_only(identity):
    torch.manual_seed(0)
    plain = _mlp(identity)
    fast = copy.deepcopy(plain)
    assert swap_modules(fast) == 3  # the Sequential and its two products
    assert type(fast) is AcceleratedMlp
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 5, 16)
    seen = []
    fast[0].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    assert seen == []  # the first product ran fused, not through fast[0]
    # training: the plain Sequential path, same gradients
    xg = x.clone().requires_grad_()
    g = torch.randn(2, 5, 16)
    ref = torch.autograd.grad(plain(xg), [xg, *plain.parameters()], g)
    got = torch.autograd.grad(fast(xg), [xg, *fast.parameters()], g)
    assert seen == [1]
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_mlp_swap_leaves_other_sequentials():
    tanh_gelu = nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate='tanh'),
                              nn.Linear(8, 4))
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    for seq in (tanh_gelu, relu):
        assert swap_modules(seq) == 2  # only the two products
        assert type(seq) is nn.Sequential


@pytest.mark.parametrize('layout', ['compact', 'permuted'])
def test_opcheck_linear_gelu(layout):
    x = torch.randn(2, 3, 4, 16)
    if layout == 'permuted':
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(linear_gelu, (x, torch.randn(8, 16),
                                        torch.randn(8)))
