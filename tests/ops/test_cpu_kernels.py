"""The C++ CPU kernels (``mmbiformer/ops/csrc``): the ``cpu`` BRA backend
and the depthwise-conv backward compute what the torch-only paths compute,
and everything falls back to those paths where the kernels do not apply."""
import platform

import pytest
import torch
import torch.nn as nn

from mmbiformer.ops import (
    BiLevelRoutingAttention,
    bra_attention,
    cpu_bra,
    cpu_ext,
)
from mmbiformer.ops.dwconv import DepthwiseConv2d, DepthwiseConvFunction

from .helpers import run_backends

LINUX_X86 = platform.system() == 'Linux' and platform.machine() == 'x86_64'


def test_kernels_build_here():
    # the project's CI runs on Linux x86-64 with a compiler: a failed build
    # there must fail a test, not silently fall back
    if not LINUX_X86:
        pytest.skip('kernels are built on Linux x86-64 only')
    assert cpu_ext.load() is not None


needs_kernels = pytest.mark.skipif(
    not (LINUX_X86 and cpu_ext.available()),
    reason='C++ CPU kernels unavailable')


def _routes(n, regions, topk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([
        torch.stack([torch.randperm(regions, generator=gen)[:topk]
                     for _ in range(regions)]) for _ in range(n)
    ])


@needs_kernels
@pytest.mark.parametrize('n,hw,n_win,heads,d,dv,topk', [
    (2, (14, 14), 7, 2, 32, 32, 3),    # 4-token regions, 12 keys (< 16)
    (1, (15, 10), 5, 1, 16, 48, 4),    # 3x2 regions: 6 queries (tail 2)
    (2, (12, 12), 4, 2, 64, 32, 5),    # 9-token regions, 45 keys
    (1, (8, 8), 2, 4, 16, 16, 4),      # topk = all regions
    # region sizes dividing 16: logits from grouped key copies, the routed
    # regions padded with zero blocks to a multiple of 16 keys
    (2, (8, 8), 4, 2, 48, 16, 5),      # 4 tokens, d != dv, 5 of 8 blocks
    (1, (6, 12), 3, 1, 32, 32, 4),     # 2x4 = 8 tokens
    (1, (4, 8), 4, 2, 16, 16, 6),      # 1x2 = 2 tokens, 6 of 8 blocks
    (1, (8, 8), 2, 2, 16, 32, 3),      # 4x4 = 16 tokens (rows), 3 routed
    # regions of more than 16 tokens: logits from a transposed key copy
    (1, (16, 16), 2, 2, 32, 32, 1),    # 64-token regions, one routed
    (1, (10, 10), 2, 1, 16, 32, 1),    # 25 tokens: padded keys, tail query
    (1, (16, 20), 2, 2, 32, 16, 2),    # 8x10 regions, 160 keys, d != dv
])
def test_token_order_kernel_matches_reference(n, hw, n_win, heads, d, dv,
                                              topk):
    torch.manual_seed(0)
    h, w = hw
    q = torch.randn(n, h, w, heads * d, requires_grad=True)
    k = torch.randn(n, h, w, heads * d, requires_grad=True)
    v = torch.randn(n, h, w, heads * dv, requires_grad=True)
    idx = _routes(n, n_win * n_win, topk)
    scale = 0.3
    g = torch.randn(n, h, w, heads * dv)

    out = cpu_bra.token_cpu_attention(q, k, v, idx, n_win, heads, scale)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))

    # reference: regions -> region-major layout, the dense masked oracle
    rh, rw = h // n_win, w // n_win

    def by_region(t):
        c = t.shape[-1] // heads
        t = t.view(n, n_win, rh, n_win, rw, heads, c)
        return t.permute(0, 5, 1, 3, 2, 4, 6).reshape(n, heads, n_win ** 2,
                                                      rh * rw, c)

    ref = bra_attention(by_region(q), by_region(k), by_region(v), idx,
                        scale=scale, backend='reference')
    ref = ref.view(n, heads, n_win, n_win, rh, rw, dv).permute(
        0, 2, 4, 3, 5, 1, 6).reshape(n, h, w, heads * dv)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize('qkv_grad', [True, False])
def test_attention_with_lepe_op_matches_separate_ops(qkv_grad):
    """BRACpuLepeAttention = token_cpu_attention(q, k, v) + conv(v), values
    and gradients (qk_dim != dim, 3x3 LePE with bias)."""
    torch.manual_seed(3)
    n, h, w, heads, qk_dim, dim, n_win = 2, 12, 12, 2, 64, 96, 3
    qkv = torch.randn(n, h, w, 2 * qk_dim + dim, requires_grad=qkv_grad)
    conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
    idx = _routes(n, n_win * n_win, 4)
    g = torch.randn(n, h, w, dim)
    params = list(conv.parameters()) + ([qkv] if qkv_grad else [])

    out = cpu_bra.token_cpu_attention_lepe(qkv, idx, n_win, heads, qk_dim,
                                           0.2, conv)
    grads = torch.autograd.grad((out * g).sum(), params)
    q, k, v = qkv.split([qk_dim, qk_dim, dim], -1)
    ref = cpu_bra.token_cpu_attention(q, k, v, idx, n_win, heads, 0.2) + \
        conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@needs_kernels
def test_backward_kernel_overwrites_the_given_gradients():
    """dq, dk, dv views handed to the kernel may hold anything (they are
    fresh allocations): the kernel zeroes the dK/dV rows it accumulates
    into, so NaN in them before the call leaves no trace; with dv_base,
    dv is that gradient plus the attention's."""
    torch.manual_seed(1)
    n, h, w, heads, d, nw = 2, 8, 8, 2, 16, 2
    qkv = torch.randn(n, h, w, 3 * heads * d)
    idx = _routes(n, nw * nw, 2)
    q, k, v = cpu_bra._split_qkv(qkv, heads * d, heads)
    kernels = cpu_ext.load()
    out, lse = kernels.bra_forward(q, k, v, idx, h, w, nw, 0.25, True)
    go = torch.randn_like(out)
    grads = []
    for fill in (0.0, float('nan')):
        dqkv = torch.full_like(qkv, fill)
        kernels.bra_backward(go, q, k, v, lse, idx, h, w, nw, 0.25,
                             *cpu_bra._split_qkv(dqkv, heads * d, heads))
        grads.append(dqkv)
    assert torch.isfinite(grads[1]).all()
    assert torch.equal(grads[0], grads[1])
    # dv_base (e.g. the LePE's gradient, here a strided view): dv is it
    # plus the attention's dv; dq and dk are the same as without it
    dqkv = torch.full_like(qkv, float('nan'))
    held = torch.randn(n, h, w, 3 * heads * d)[..., heads * d:2 * heads * d]
    base = held.reshape(n, h * w, heads, d)
    assert base.data_ptr() == held.data_ptr()  # a view, not a copy
    kernels.bra_backward(go, q, k, v, lse, idx, h, w, nw, 0.25,
                         *cpu_bra._split_qkv(dqkv, heads * d, heads),
                         dv_base=base)
    torch.testing.assert_close(dqkv[..., :2 * heads * d],
                               grads[0][..., :2 * heads * d], rtol=0, atol=0)
    torch.testing.assert_close(dqkv[..., 2 * heads * d:],
                               grads[0][..., 2 * heads * d:] + held)
    with pytest.raises(RuntimeError, match='dv_base must be'):
        kernels.bra_backward(go, q, k, v, lse, idx, h, w, nw, 0.25,
                             *cpu_bra._split_qkv(dqkv, heads * d, heads),
                             dv_base=base[:, 1:])


@needs_kernels
def test_attention_with_lepe_op_empty_batch():
    qkv = torch.randn(0, 12, 12, 224, requires_grad=True)
    conv = nn.Conv2d(96, 96, 3, padding=1, groups=96)
    idx = torch.zeros(0, 9, 4, dtype=torch.long)
    out = cpu_bra.token_cpu_attention_lepe(qkv, idx, 3, 2, 64, 0.2, conv)
    out.sum().backward()
    assert out.shape == (0, 12, 12, 96) and qkv.grad.shape == qkv.shape
    assert not conv.weight.grad.any() and not conv.bias.grad.any()


@needs_kernels
def test_region_major_functional_backend():
    torch.manual_seed(1)
    q = torch.randn(2, 2, 9, 5, 32, requires_grad=True)
    k = torch.randn(2, 2, 9, 5, 32, requires_grad=True)
    v = torch.randn(2, 2, 9, 5, 16, requires_grad=True)
    idx = _routes(2, 9, 3)
    outs = []
    for backend in ('cpu', 'reference'):
        o = bra_attention(q, k, v, idx, scale=0.2, backend=backend)
        outs.append((o, torch.autograd.grad(o.square().sum(), (q, k, v))))
    (o, g), (o_ref, g_ref) = outs
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize('side_dwconv,op', [
    (5, cpu_bra.BRACpuLepeAttention),  # attention + LePE, one qkv gradient
    (3, cpu_bra.BRACpuLepeAttention),
    (0, cpu_bra.BRACpuAttention),
])
def test_module_cpu_backend_matches_reference_and_auto_picks_it(
        monkeypatch, side_dwconv, op):
    calls = []
    apply = op.apply
    monkeypatch.setattr(op, 'apply', lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4,
                                auto_pad=True, side_dwconv=side_dwconv)
    x = torch.randn(2, 30, 23, 64)  # padded to 35 x 28
    g = torch.randn(2, 30, 23, 64)
    (y, gx, gp, info), (y_ref, gx_ref, gp_ref, info_ref) = run_backends(
        m, x, g, ('auto', 'reference'))
    assert info['backend'] == 'cpu' and len(calls) == 1
    assert torch.equal(info['topk_index'], info_ref['topk_index'])
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-5)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=1e-3,
                                   rtol=1e-4, msg=name)


@pytest.mark.parametrize('kwargs,x_kwargs', [
    (dict(pad_mode='masked', auto_pad=True), dict(size=(1, 9, 9, 64))),
    (dict(num_heads=8), dict(size=(1, 14, 14, 64))),    # head dim 8
    (dict(), dict(size=(1, 14, 14, 64), dtype=torch.float64)),
])
def test_cpu_backend_falls_back_to_fused(monkeypatch, kwargs, x_kwargs):
    monkeypatch.setattr(cpu_bra.BRACpuAttention, 'apply',
                        lambda *a: pytest.fail('cpu kernel used'))
    kwargs = dict(dict(num_heads=2, n_win=7, topk=4, backend='cpu'),
                  **kwargs)
    dtype = x_kwargs.pop('dtype', torch.float32)
    m = BiLevelRoutingAttention(64, **kwargs).to(dtype)
    x = torch.randn(**x_kwargs, dtype=dtype)
    y, info = m(x, return_routing=True)
    assert info['backend'] == 'fused'
    m.backend = 'reference'
    torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)


def test_without_kernels_everything_runs_the_torch_paths(monkeypatch):
    monkeypatch.setenv(cpu_ext.ENV_SWITCH, '0')
    assert cpu_ext.load() is None
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4)
    x = torch.randn(1, 14, 14, 64, requires_grad=True)
    y, info = m(x, return_routing=True)
    y.sum().backward()
    assert info['backend'] == 'fused' and x.grad is not None


@needs_kernels
@pytest.mark.parametrize('k', [3, 5])
@pytest.mark.parametrize('channels_last', [True, False])
@pytest.mark.parametrize('bias', [True, False])
def test_depthwise_conv_gradients_match_conv2d(monkeypatch, k,
                                               channels_last, bias):
    calls = []
    apply = DepthwiseConvFunction.apply
    monkeypatch.setattr(DepthwiseConvFunction, 'apply',
                        lambda *a: calls.append(1) or apply(*a))
    torch.manual_seed(0)
    ours = DepthwiseConv2d(48, k, bias=bias)
    ref = nn.Conv2d(48, 48, k, padding=k // 2, groups=48, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 48, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 48, 11, 9)
    res = []
    for conv in (ours, ref):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        (y * g).sum().backward()
        res.append((y, xi.grad, [p.grad for p in conv.parameters()]))
    assert calls == [1]
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = res
    assert torch.equal(y, y_ref)  # same forward call
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_depthwise_conv_residual_equals_input_plus_conv(grad, dtype):
    """forward_residual(x) = x + conv(x), values and gradients (float32:
    the identity folded into the kernel; bfloat16: the plain sum)."""
    torch.manual_seed(2)
    conv = DepthwiseConv2d(32, 3).to(dtype)
    x = torch.randn(2, 32, 10, 7, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    g = torch.randn(2, 32, 10, 7, dtype=dtype)
    res = []
    for fn in (conv.forward_residual, lambda t: t + conv(t)):
        conv.zero_grad()
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = fn(xi)
        if grad:
            (y.float() * g.float()).sum().backward()
            res.append((y, xi.grad, conv.weight.grad.clone(),
                        conv.bias.grad.clone()))
        else:
            res.append((y, ))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else \
        dict(atol=0, rtol=0)  # bfloat16 takes the very same ops
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, **tol)


def test_depthwise_conv_without_grad_is_plain_conv(monkeypatch):
    monkeypatch.setattr(DepthwiseConvFunction, 'apply',
                        lambda *a: pytest.fail('custom backward used'))
    conv = DepthwiseConv2d(8, 5)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        conv(x)
    conv.requires_grad_(False)
    conv(x)
    with pytest.raises(ValueError, match='odd kernel size'):
        DepthwiseConv2d(8, 4)
