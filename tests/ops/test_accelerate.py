"""swap_modules(): the swapped modules compute what nn.Linear and the GELU
MLP compute, keep the state dict and pass opcheck and a full-graph
compile."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbiformer.ops import BiLevelRoutingAttention, cpu_ext
from mmbiformer.ops import accelerate as acc
from mmbiformer.ops.accelerate import (
    AcceleratedDepthwiseConv,
    AcceleratedLinear,
    AcceleratedMlp,
    add_layer_norm,
    depthwise_conv2d,
    depthwise_weight_grad,
    gelu_mlp,
    gelu_mlp_inference,
    linear,
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
    assert swap_modules(fast) == 3  # qkv.qkv, wo and the 5x5 LePE
    x = torch.randn(2, 6, 7, 32)
    compiled = torch.compile(fast, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), plain(x), atol=1e-5, rtol=1e-5)


def _mlp(identity: bool) -> nn.Sequential:
    layers = [nn.Linear(16, 48)] + ([nn.Identity()] if identity else []) + \
        [nn.GELU(), nn.Linear(48, 16)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize('identity', [True, False])
@pytest.mark.parametrize('fused_training', [True, False])
def test_mlp_swap_same_function(identity, fused_training, monkeypatch):
    # inference: the GELU fused into the first product; training: one
    # gelu_mlp op where training_fusions() says so, else the Sequential
    monkeypatch.setattr(acc, 'training_fusions', lambda x: fused_training)
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
    xg = x.clone().requires_grad_()
    g = torch.randn(2, 5, 16)
    ref = torch.autograd.grad(plain(xg), [xg, *plain.parameters()], g)
    got = torch.autograd.grad(fast(xg), [xg, *fast.parameters()], g)
    assert seen == ([] if fused_training else [1])
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_training_fusions_only_at_avx512(monkeypatch):
    x = torch.zeros(2, 16)
    monkeypatch.setattr(cpu_ext, 'load', lambda: object())
    for level, expected in [('avx512', True), ('avx2', False),
                            ('default', False)]:
        monkeypatch.setattr(cpu_ext, 'capability', lambda lv=level: lv)
        assert acc.training_fusions(x) is expected
    assert not acc.training_fusions(x.double())
    monkeypatch.setattr(cpu_ext, 'load', lambda: None)
    monkeypatch.setattr(cpu_ext, 'capability', lambda: 'avx512')
    assert not acc.training_fusions(x)


def _mlp_args(bias: bool):
    torch.manual_seed(0)
    args = [torch.randn(2, 3, 5, 32), torch.randn(96, 32) * 0.3,
            torch.randn(96) if bias else None, torch.randn(32, 96) * 0.3,
            torch.randn(32) if bias else None]
    return [a.requires_grad_() if a is not None else None for a in args]


@pytest.mark.parametrize('bias', [True, False])
def test_gelu_mlp_op(bias):
    args = _mlp_args(bias)
    torch.library.opcheck(gelu_mlp, tuple(args))
    x, w1, b1, w2, b2 = args
    g = torch.randn(2, 3, 5, 32)
    params = [t for t in args if t is not None]
    ref_out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    ref = torch.autograd.grad(ref_out, params, g)
    out = gelu_mlp(*args)[0]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for a, e in zip(torch.autograd.grad(out, params, g), ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_gelu_mlp_backward_cpp_equals_torch(monkeypatch):
    if not cpu_ext.available():
        pytest.skip('the CPU kernels are not built here')
    x, w1, b1, w2, b2 = (t.detach() for t in _mlp_args(True))
    h = F.linear(x, w1, b1)
    # pre-activations far into both tails, where erfc's polynomial and
    # torch's erf part ways first
    h[0, 0, 0, :8] = torch.tensor([-9., -6., -3., -1e-3, 1e-3, 3., 6., 9.])
    g = torch.randn(2, 3, 5, 32)
    got = acc.gelu_mlp_backward(g, x, h, w1, w2)
    monkeypatch.setattr(cpu_ext, 'load', lambda: None)
    ref = acc.gelu_mlp_backward(g, x, h, w1, w2)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def _add_norm_args(scale: bool, channels: int = 32):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, channels, requires_grad=True)
    y = torch.randn(3, 4, 5, channels, requires_grad=True)
    s = torch.tensor([0., 2., 2.]) if scale else None
    w = torch.randn(channels, requires_grad=True)
    b = torch.randn(channels, requires_grad=True)
    return x, y, s, w, b, 1e-6


@pytest.mark.parametrize('scale', [True, False])
@pytest.mark.parametrize('channels', [32, 24])  # 24: no C++ kernel
def test_add_layer_norm_op(scale, channels):
    args = _add_norm_args(scale, channels)
    torch.library.opcheck(add_layer_norm, args)
    x, y, s, w, b, eps = args
    z_ref = x + y if s is None else x + y * s.view(-1, 1, 1, 1)
    out_ref = F.layer_norm(z_ref, (channels, ), w, b, eps)
    z, out, _, _ = add_layer_norm(*args)
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    gz, gn = torch.randn_like(z), torch.randn_like(z)
    params = [x, y, w, b]
    ref = torch.autograd.grad((z_ref * gz).sum() + (out_ref * gn).sum(),
                              params)
    got = torch.autograd.grad((z * gz).sum() + (out * gn).sum(), params)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('scale', [True, False])
def test_add_layer_norm_cpp_equals_torch(scale, monkeypatch):
    if not cpu_ext.available():
        pytest.skip('the CPU kernels are not built here')
    x, y, s, w, b, eps = (t.detach() if isinstance(t, torch.Tensor) else t
                          for t in _add_norm_args(scale))
    got = add_layer_norm(x, y, s, w, b, eps)
    gz, gn = torch.randn_like(x), torch.randn_like(x)
    got_bwd = acc.add_layer_norm_backward(gz, gn, got[0], got[2], got[3], w,
                                          b, s)
    monkeypatch.setattr(cpu_ext, 'load', lambda: None)
    ref = add_layer_norm(x, y, s, w, b, eps)
    ref_bwd = acc.add_layer_norm_backward(gz, gn, ref[0], ref[2], ref[3], w,
                                          b, s)
    for a, e in zip(got + got_bwd, ref + ref_bwd):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_mlp_swap_leaves_other_sequentials():
    tanh_gelu = nn.Sequential(nn.Linear(4, 8), nn.GELU(approximate='tanh'),
                              nn.Linear(8, 4))
    relu = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    for seq in (tanh_gelu, relu):
        assert swap_modules(seq) == 2  # only the two products
        assert type(seq) is nn.Sequential


@pytest.mark.parametrize('layout', ['compact', 'permuted'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('blocks', [True, False])
def test_opcheck_gelu_mlp_inference(layout, bias, blocks, monkeypatch):
    monkeypatch.setattr(acc, 'mlp_in_blocks', lambda x: blocks)
    x = torch.randn(2, 3, 4, 16)
    if layout == 'permuted':
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    args = (x, torch.randn(48, 16), torch.randn(48) if bias else None,
            torch.randn(16, 48), torch.randn(16) if bias else None)
    torch.library.opcheck(gelu_mlp_inference, args)
    expected = F.linear(F.gelu(F.linear(*args[:3])), *args[3:])
    torch.testing.assert_close(gelu_mlp_inference(*args), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('bias', [True, False])
def test_mlp_blocks_cover_every_row(bias, monkeypatch):
    # blocks of 9 hidden rows over 50 rows: the last block a short one
    monkeypatch.setattr(acc, 'mlp_in_blocks', lambda x: True)
    monkeypatch.setattr(acc, '_BLOCKS_ABOVE', 0)
    monkeypatch.setattr(acc, '_BLOCK_BYTES', 9 * 24 * 4)
    calls = []
    product = acc._product
    monkeypatch.setattr(acc, '_product',
                        lambda *a: calls.append(1) or product(*a))
    torch.manual_seed(0)
    args = (torch.randn(5, 10, 8), torch.randn(24, 8),
            torch.randn(24) if bias else None, torch.randn(8, 24),
            torch.randn(8) if bias else None)
    got = gelu_mlp_inference(*args)
    assert len(calls) == 2 * 6  # two products for each of 6 blocks
    expected = F.linear(F.gelu(F.linear(*args[:3])), *args[3:])
    assert got.shape == (5, 10, 8) and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_products_in_onednn_at_avx512_only(monkeypatch):
    # below AVX-512 torch's products and the MLP in row blocks (measured
    # faster on an AVX2-only processor); at AVX-512 oneDNN's products
    x = torch.zeros(2, 16)
    for level in ('avx512', 'avx2', 'default'):
        monkeypatch.setattr(cpu_ext, 'capability', lambda lv=level: lv)
        assert acc.mlp_in_blocks(x) is (level == 'avx2')
        if torch.backends.mkldnn.is_available():
            assert (acc._onednn_linear() is not None) is (level == 'avx512')
    assert not acc.mlp_in_blocks(x.double())


def _channels_last(*shape):
    n, c, h, w = shape
    return torch.randn(n, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize('k', [5, 7])
@pytest.mark.parametrize('layout', ['channels_last', 'contiguous'])
def test_depthwise_conv_gradients_match_conv2d(k, layout):
    torch.manual_seed(0)
    plain = nn.Conv2d(24, 24, k, padding=k // 2, groups=24)
    fast = copy.deepcopy(plain)
    assert swap_modules(fast) == 1
    assert type(fast) is AcceleratedDepthwiseConv
    x = _channels_last(2, 24, 9, 11)
    if layout == 'contiguous':
        x = x.contiguous()
    x.requires_grad_()
    g = torch.randn(2, 24, 9, 11)
    ref = torch.autograd.grad(plain(x), [x, *plain.parameters()], g)
    got = torch.autograd.grad(fast(x), [x, *fast.parameters()], g)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_depthwise_weight_grad_cpp_equals_torch(monkeypatch):
    if not cpu_ext.available():
        pytest.skip('the CPU kernels are not built here')
    torch.manual_seed(0)
    x, g = _channels_last(3, 40, 12, 10), _channels_last(3, 40, 12, 10)
    got = depthwise_weight_grad(x, g, 5)
    monkeypatch.setattr(cpu_ext, 'load', lambda: None)
    ref = depthwise_weight_grad(x, g, 5)  # torch's convolution_backward
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_only_large_odd_stride1_depthwise_convs_are_swapped():
    keep = [nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 3x3: torch's wins
            nn.Conv2d(8, 8, 5, padding=2, groups=8, stride=2),
            nn.Conv2d(8, 16, 5, padding=2, groups=8),
            nn.Conv2d(8, 8, 5, padding=1, groups=8)]
    for conv in keep:
        assert swap_modules(conv) == 0 and type(conv) is nn.Conv2d


@pytest.mark.parametrize('layout', ['compact', 'permuted'])
def test_opcheck_depthwise(layout):
    x = torch.randn(2, 6, 7, 5)
    if layout == 'permuted':
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    torch.library.opcheck(depthwise_conv2d, (
        x.requires_grad_(), torch.randn(6, 1, 5, 5, requires_grad=True),
        torch.randn(6, requires_grad=True)))
    torch.library.opcheck(depthwise_weight_grad,
                          (x.detach(), torch.randn_like(x), 5))


def test_swapped_modules_follow_cpu_autocast(monkeypatch):
    # under autocast the products run in bfloat16, as in the plain modules
    # (the registered operators would see mixed dtypes)
    monkeypatch.setattr(acc, 'training_fusions', lambda x: True)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2, groups=16),
                          nn.Flatten(2), _Transpose(), _mlp(True))
    fast = copy.deepcopy(plain)
    assert swap_modules(fast) == 4
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), \
                torch.autocast('cpu', dtype=torch.bfloat16):
            out, ref = fast(x), plain(x)
        assert out.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref)
        if grad:
            got = torch.autograd.grad(out.float().sum(), fast.parameters())
            exp = torch.autograd.grad(ref.float().sum(), plain.parameters())
            for a, e in zip(got, exp):
                torch.testing.assert_close(a, e)


class _Transpose(nn.Module):

    def forward(self, x):
        return x.transpose(1, 2)
