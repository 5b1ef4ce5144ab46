import platform

import pytest
import torch
import torch.nn as nn

from mmbiformer.models.layers import BiFormerBlock
from mmbiformer.ops import cpu_ext
from mmbiformer.ops.norm import AddNormFunction, add_norm

needs_kernels = pytest.mark.skipif(
    not (platform.system() == 'Linux' and platform.machine() == 'x86_64'
         and cpu_ext.available()),
    reason='C++ CPU kernels unavailable')


def _norm(c, seed=0):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():  # not the identity init: the gradients show it
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def _reference(x, y, norm, scale):
    z = x + y if scale is None else torch.addcmul(x, y, scale)
    return z, norm(z)


@needs_kernels
@pytest.mark.parametrize('drop', ['none', 'scale'])
@pytest.mark.parametrize('use', ['both', 'norm-only'])
def test_add_norm_matches_the_separate_ops(monkeypatch, drop, use):
    calls = []
    apply = AddNormFunction.apply
    monkeypatch.setattr(AddNormFunction, 'apply',
                        lambda *a: calls.append(1) or apply(*a))
    n, h, w, c = 3, 5, 7, 48
    norm, ref_norm = _norm(c), _norm(c)
    x = (torch.randn(n, h, w, c) * 2 + 1).requires_grad_()
    y = torch.randn(n, h, w, c).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = y.detach().clone().requires_grad_()
    # sample 1 dropped, the others kept at 1 / keep
    scale = None if drop == 'none' else torch.tensor(
        [1.25, 0., 1.25]).view(n, 1, 1, 1)
    gz, gn = torch.randn(n, h, w, c), torch.randn(n, h, w, c)
    z, out = add_norm(x, y, norm, scale)
    z_ref, out_ref = _reference(x_ref, y_ref, ref_norm, scale)
    assert calls == [1]
    # x + y * scale may be one fused multiply-add on one CPU and two
    # roundings on another: float32 tolerance, not bit equality
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=1.3e-6)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    if use == 'both':
        ((z * gz).sum() + (out * gn).sum()).backward()
        ((z_ref * gz).sum() + (out_ref * gn).sum()).backward()
    else:  # z feeds nothing else: its gradient arrives as None
        (out * gn).sum().backward()
        (out_ref * gn).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y.grad, y_ref.grad, atol=1e-4, rtol=1e-5)
    if scale is not None:
        assert y.grad[1].abs().max() == 0  # the dropped sample
    torch.testing.assert_close(norm.weight.grad, ref_norm.weight.grad,
                               atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(norm.bias.grad, ref_norm.bias.grad,
                               atol=1e-3, rtol=1e-5)


@needs_kernels
def test_add_norm_with_only_z_used():
    norm = _norm(32)
    x = torch.randn(2, 3, 32, requires_grad=True)
    y = torch.randn(2, 3, 32, requires_grad=True)
    scale = torch.tensor([2., 0.]).view(2, 1, 1)
    z, _ = add_norm(x, y, norm, scale)
    g = torch.randn_like(z)
    (z * g).sum().backward()
    torch.testing.assert_close(x.grad, g)
    torch.testing.assert_close(y.grad, g * scale)
    assert norm.weight.grad.abs().max() == 0


def test_add_norm_falls_back_to_the_separate_ops(monkeypatch):
    calls = []
    monkeypatch.setattr(AddNormFunction, 'apply',
                        lambda *a: calls.append(1))
    norm = _norm(24)  # 24 channels: not a multiple of 16
    x, y = torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    z, out = add_norm(x.requires_grad_(), y, norm)
    assert calls == []
    torch.testing.assert_close(out, norm(x + y), atol=0, rtol=0)
    norm32 = _norm(32)
    x, y = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():  # inference: the separate ops, bit for bit
        z, out = add_norm(x, y, norm32)
    assert calls == []
    assert torch.equal(out, norm32(x + y))


@needs_kernels
@pytest.mark.parametrize('drop_path', [0., 0.3])
def test_block_training_step_uses_the_op_and_keeps_its_gradients(
        monkeypatch, drop_path):
    """A BiFormer block in training: the fused op runs and the block's
    output and gradients equal those of the separate ops (the same drop
    path samples: the RNG is reset before each run; branches run for the
    whole batch, as when drop path keeps every sample)."""
    monkeypatch.setattr('mmbiformer.models.layers.kept_samples',
                        lambda scale: None)

    def run(use_op):
        torch.manual_seed(0)
        block = BiFormerBlock(32, nn.Linear(32, 32), drop_path=drop_path)
        block.train()
        x = torch.randn(4, 32, 6, 6, requires_grad=True)
        torch.manual_seed(1)
        if use_op:
            out = block(x)
        else:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr('mmbiformer.ops.norm._applies',
                           lambda *a: False)
                out = block(x)
        out.square().sum().backward()
        return out, x.grad, {k: p.grad for k, p in block.named_parameters()}

    calls = []
    apply = AddNormFunction.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AddNormFunction, 'apply',
                   lambda *a: calls.append(1) or apply(*a))
        out, gx, grads = run(True)
    assert calls == [1]
    out_ref, gx_ref, grads_ref = run(False)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-4,
                                   rtol=1e-4, msg=name)
