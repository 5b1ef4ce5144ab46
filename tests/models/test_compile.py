"""The whole backbone compiles: no graph break in training or inference,
static or dynamic shapes, and the compiled model equals eager."""
import pytest
import torch

pytest.importorskip('mmcv')
from mini_arch import MINI  # noqa: E402

from mmbiformer.models import BiFormer  # noqa: E402


def _model(**kwargs):
    torch.manual_seed(0)
    model = BiFormer(arch=MINI, n_win=7, out_indices=(0, 1, 2, 3), **kwargs)
    model.init_weights()
    for p in model.parameters():  # non-trivial norms and biases
        p.data.add_(torch.randn_like(p) * 0.02)
    return model


def _breaks(model, x):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_break_count, [
        str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('size,kwargs', [
    ((112, 112), dict()),
    ((90, 130), dict(auto_pad=True, drop_path_rate=0.2)),
    ((90, 130), dict(auto_pad=True, pad_mode='masked')),
])
def test_no_graph_breaks(mode, size, kwargs):
    model = _model(**kwargs).train(mode == 'train')
    x = torch.randn(2, 3, *size, requires_grad=mode == 'train')
    count, reasons = _breaks(model, x)
    assert count == 0, reasons


def _step(model, x, grad):
    outs = model(x)
    loss = sum((o * g).sum() for o, g in zip(outs, grad))
    loss.backward()
    grads = {n.removeprefix('_orig_mod.'): p.grad.clone()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return [o.detach() for o in outs], grads


def _assert_equal(compiled, eager):
    for a, e in zip(compiled[0], eager[0]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    # 1e-3 relative to each gradient, plus 1e-5 of the largest one: the
    # conv biases before BatchNorm have zero gradients in exact arithmetic,
    # so theirs (~1e-4 against ~100 elsewhere) are rounding noise, which
    # no two summation orders share
    largest = max(float(e.norm()) for e in eager[1].values())
    for name, e in eager[1].items():
        err = float((compiled[1][name] - e).norm())
        assert err <= 1e-3 * float(e.norm()) + 1e-5 * largest, (name, err)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """inductor, fullgraph, forward and backward of a training step (no
    drop path, so that both draw nothing at random)."""
    model = _model().train()
    x = torch.randn(2, 3, 112, 112)
    grad = [torch.randn(2, *shape) for shape in model.output_shapes(112, 112)]
    eager = _step(model, x, grad)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _assert_equal(_step(compiled, x, grad), eager)


@pytest.mark.slow
def test_dynamic_shapes_with_auto_pad():
    """``dynamic=True``: two dense-prediction sizes (neither a multiple of
    the region grid) run through one compiled graph and equal eager."""
    model = _model(auto_pad=True).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend='aot_eager')
    with torch.no_grad():
        for size in ((90, 130), (118, 94)):
            x = torch.randn(1, 3, *size)
            for a, e in zip(compiled(x), model(x)):
                torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
