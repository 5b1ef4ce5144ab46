"""``mmbiformer.ops.linear.Linear``: nn.Linear's results and parameters,
with oneDNN products on the CPU."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbiformer.ops import linear as lin
from mmbiformer.ops.linear import (
    DnnLinearFunction,
    DnnMlpFunction,
    Linear,
    gelu_mlp,
)

needs_dnn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and lin._dnn_op() is not None),
    reason='torch was built without oneDNN')


def _pair(cin, cout, bias=True):
    torch.manual_seed(0)
    ours = Linear(cin, cout, bias=bias)
    ref = nn.Linear(cin, cout, bias=bias)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _run(layer, x, g):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    (y * g).sum().backward()
    return y, x.grad, [p.grad for p in layer.parameters()]


@needs_dnn
@pytest.mark.parametrize('shape', [(2, 40, 30), (2, 7, 7), (1, 5, 7),
                                   (300, )],
                         ids=['long', 'short', 'fewer-rows-than-in', '2d'])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('layout', ['contiguous', 'permuted'])
@pytest.mark.parametrize('cout', [96, 40], ids=['widens', 'narrows'])
def test_values_and_gradients_match_nn_linear(monkeypatch, shape, bias,
                                              layout, cout):
    calls = []
    apply = DnnLinearFunction.apply
    monkeypatch.setattr(DnnLinearFunction, 'apply',
                        lambda *a: calls.append(1) or apply(*a))
    ours, ref = _pair(64, cout, bias)
    if layout == 'permuted':  # channels-last view of an NCHW-like tensor
        x = torch.randn(shape[0], 64, *shape[1:]).movedim(1, -1)
    else:
        x = torch.randn(*shape, 64)
    x.requires_grad_()
    g = torch.randn(*shape, cout)
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = _run(ours, x, g), _run(ref, x, g)
    assert calls == [1]  # the oneDNN function ran
    assert gx is not None and gx.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-5)
    assert len(gp) == len(gp_ref) == (2 if bias else 1)
    for a, b in zip(gp, gp_ref):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)


@needs_dnn
def test_frozen_weight_and_input_without_grad():
    ours, ref = _pair(32, 48)
    ours.weight.requires_grad_(False)
    ref.weight.requires_grad_(False)
    x = torch.randn(4, 5, 32)
    g = torch.randn(4, 5, 48)
    (y, gx, _), (y_ref, _, _) = _run(ours, x, g), _run(ref, x, g)
    assert gx is None and ours.weight.grad is None
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@needs_dnn
def test_forward_gelu_fuses_only_without_grad():
    ours, _ = _pair(64, 192)
    x = torch.randn(3, 9, 64)
    want = F.gelu(F.linear(x, ours.weight, ours.bias))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_gelu(x), want, atol=1e-5,
                                   rtol=1e-5)
    y = ours.forward_gelu(x.requires_grad_())
    assert y.grad_fn.name() == 'GeluBackward0'  # unfused: GELU has a grad
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_plain_path_where_onednn_does_not_apply(monkeypatch):
    monkeypatch.setattr(DnnLinearFunction, 'apply',
                        lambda *a: pytest.fail('oneDNN path taken'))
    ours, ref = _pair(16, 8)
    x = torch.randn(2, 5, 16, requires_grad=True)
    # float64, CPU autocast and JIT tracing keep nn.Linear's own call
    ours64 = Linear(16, 8).double()
    assert ours64(x.double()).dtype == torch.float64
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16
    traced = torch.jit.trace(ours, x.detach())
    assert 'aten::linear' in str(traced.graph)
    with torch.backends.mkldnn.flags(enabled=False):
        torch.testing.assert_close(ours(x), ref(x))


def test_checkpoints_interchange_with_nn_linear():
    ours, ref = _pair(12, 20)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = Linear(12, 20)
    fresh.load_state_dict(ref.state_dict())
    assert torch.equal(fresh.weight, ref.weight)


def _mlp_pair(cin, hidden, bias=True):
    torch.manual_seed(0)
    ours = nn.Sequential(Linear(cin, hidden, bias=bias), nn.GELU(),
                         Linear(hidden, cin, bias=bias))
    ref = nn.Sequential(nn.Linear(cin, hidden, bias=bias), nn.GELU(),
                        nn.Linear(hidden, cin, bias=bias))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@needs_dnn
@pytest.mark.parametrize('rows', [(2, 40, 30), (3, 7)],
                         ids=['long', 'short'])
@pytest.mark.parametrize('bias', [True, False])
def test_gelu_mlp_is_one_op_with_the_gradients_of_three(monkeypatch, rows,
                                                        bias):
    calls = []
    apply = DnnMlpFunction.apply
    monkeypatch.setattr(DnnMlpFunction, 'apply',
                        lambda *a: calls.append(1) or apply(*a))
    ours, ref = _mlp_pair(32, 96, bias)
    x = torch.randn(*rows, 32).requires_grad_()
    g = torch.randn(*rows, 32)
    x_ref = x.detach().clone().requires_grad_()
    y = gelu_mlp(x, ours[0], ours[2])
    y_ref = ref(x_ref)
    assert calls == [1] and y.grad_fn.name() == 'DnnMlpFunctionBackward'
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-5)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-5,
                                   msg=name)


@needs_dnn
def test_gelu_mlp_with_frozen_layers_and_without_grad():
    ours, ref = _mlp_pair(16, 48)
    x = torch.randn(2, 5, 16)
    g = torch.randn(2, 5, 16)
    # fc1 frozen, input without grad: only fc2's gradients are asked for
    for layer in (ours[0], ref[0]):
        layer.requires_grad_(False)
    (gelu_mlp(x, ours[0], ours[2]) * g).sum().backward()
    (ref(x) * g).sum().backward()
    assert ours[0].weight.grad is None and ours[0].bias.grad is None
    torch.testing.assert_close(ours[2].weight.grad, ref[2].weight.grad,
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours[2].bias.grad, ref[2].bias.grad)
    # without gradients: the GELU fused into fc1, no autograd graph
    with torch.no_grad():
        y = gelu_mlp(x, ours[0], ours[2])
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    assert y.grad_fn is None


def test_gelu_mlp_keeps_plain_modules(monkeypatch):
    monkeypatch.setattr(DnnMlpFunction, 'apply',
                        lambda *a: pytest.fail('fused MLP taken'))
    _, ref = _mlp_pair(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    torch.testing.assert_close(gelu_mlp(x, ref[0], ref[2]), ref(x))
    ours, _ = _mlp_pair(8, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert gelu_mlp(x, ours[0], ours[2]).dtype == torch.bfloat16


def test_gelu_and_grad_kernel_matches_float64():
    """gelu(h) and grad * gelu'(h) (in place) from the C++ kernel: within a
    few float32 ulps of the float64 result over the whole range (torch's
    float32 GELU is off by up to 1e-6 absolute on the negative side, where
    1 + erf cancels; the kernel's erfc form does not)."""
    from mmbiformer.ops import cpu_ext
    if cpu_ext.load() is None:
        pytest.skip('C++ CPU kernels unavailable')
    h = torch.cat([torch.linspace(-14, 14, 100_003),
                   torch.randn(3, 7, 33)[..., 1:].flatten()])  # odd tail
    grad = torch.randn_like(h)
    dh = grad.clone()
    g = lin.gelu_and_grad_(h, dh)
    g_ref = F.gelu(h.double())
    dh_ref = torch.ops.aten.gelu_backward(grad.double(), h.double())
    for got, ref in ((g, g_ref), (dh, dh_ref)):
        err = (got.double() - ref).abs()
        assert (err <= 2e-7 + 2.5e-7 * ref.abs()).all(), err.max()


@pytest.mark.parametrize('kernels', [True, False])
def test_gelu_and_grad_falls_back_to_torch(kernels, monkeypatch):
    """Without the kernels, or for non-contiguous tensors, torch's gelu and
    gelu_backward give the results."""
    from mmbiformer.ops import cpu_ext
    if not kernels:
        monkeypatch.setattr(cpu_ext, 'load', lambda verbose=False: None)
    h = torch.randn(100, 64).t()  # not contiguous
    grad = torch.randn(100, 64).t()
    for x, gr in ((h, grad), (h.contiguous(), grad.contiguous())):
        if kernels and x.is_contiguous():
            continue  # the kernel's case, above
        dh = gr.clone()
        g = lin.gelu_and_grad_(x, dh)
        assert torch.equal(g, F.gelu(x))
        assert torch.equal(dh, torch.ops.aten.gelu_backward(gr, x))
