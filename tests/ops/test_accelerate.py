"""accelerate(): the swapped modules compute what nn.Linear computes, keep
the state dict and pass opcheck and a full-graph compile."""
import copy

import pytest
import torch
import torch.nn as nn

from mmbiformer.ops import BiLevelRoutingAttention
from mmbiformer.ops.accelerate import AcceleratedLinear, accelerate, linear


@pytest.mark.parametrize('shape', [(7, 16), (2, 5, 3, 16)])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_op_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(16, 24, bias=bias)
    fast = copy.deepcopy(lin)
    assert accelerate(fast) == 1
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
    assert accelerate(fast) == 2  # qkv.qkv and wo
    x = torch.randn(2, 6, 7, 32)
    compiled = torch.compile(fast, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)
