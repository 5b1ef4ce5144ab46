"""accelerate(model): BiFormer backbones only, the state dict unchanged,
the same outputs, and stochastic depth on the kept samples computing what
DropPath computes."""
import copy

import pytest
import torch
import torch.nn as nn
from mini_arch import MINI

from mmbiformer.models import BiFormer, BiFormerBlock
from mmbiformer.models.accelerate import (
    KeptSamplesBlock,
    accelerate,
    residual_kept,
)
from mmbiformer.models.layers import DropPath
from mmbiformer.ops.accelerate import AcceleratedLinear, AcceleratedMlp


class _Net(nn.Module):
    # a BiFormer backbone with a linear head that is not part of it

    def __init__(self, drop_path_rate=0.):
        super().__init__()
        self.backbone = BiFormer(arch=dict(MINI),
                                 drop_path_rate=drop_path_rate,
                                 out_indices=(3, ))
        self.head = nn.Linear(256, 5)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


def _model(drop_path_rate=0.):
    torch.manual_seed(0)
    return _Net(drop_path_rate)


def test_only_biformer_backbones_and_state_dict_kept():
    plain = _model()
    fast = copy.deepcopy(plain)
    counts = accelerate(fast)
    assert counts['backbones'] == 1 and counts['blocks'] == 5
    assert type(fast.head) is nn.Linear  # the head is not a BiFormer's
    blocks = [m for m in fast.modules() if isinstance(m, BiFormerBlock)]
    assert all(type(b) is KeptSamplesBlock for b in blocks)
    assert all(type(b.mlp) is AcceleratedMlp for b in blocks)
    assert all(type(b.mlp[0]) is AcceleratedLinear for b in blocks)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    _model().load_state_dict(fast.state_dict())
    assert accelerate(fast) == {'backbones': 1, 'modules': 0, 'blocks': 0}


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_same_outputs_and_gradients(mode):
    plain = _model().backbone
    fast = copy.deepcopy(plain)
    accelerate(fast)
    getattr(plain, mode)()
    getattr(fast, mode)()
    x = torch.randn(2, 3, 224, 224)
    if mode == 'eval':
        with torch.no_grad():
            torch.testing.assert_close(fast(x), plain(x), atol=1e-4,
                                       rtol=1e-4)
        return
    (plain(x)[0] ** 2).mean().backward()
    (fast(x)[0] ** 2).mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3,
                                   msg=name)


def test_kept_samples_equal_drop_path_with_the_same_draw():
    drop = DropPath(0.4).train()
    branch = nn.Linear(6, 6)
    x, inp = torch.randn(16, 3, 6), torch.randn(16, 3, 6)
    torch.manual_seed(3)
    got = residual_kept(x, branch, inp, drop)
    torch.manual_seed(3)
    kept = (torch.rand(16) < 0.6).float().view(16, 1, 1)
    assert 0 < kept.sum() < 16  # the draw keeps some and drops some
    expected = x + branch(inp) * kept / 0.6
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_all_dropped_still_gives_every_parameter_a_gradient():
    drop = DropPath(1. - 1e-7).train()
    branch = nn.Linear(6, 6)
    x = torch.randn(4, 6, requires_grad=True)
    out = residual_kept(x, branch, x, drop)
    torch.testing.assert_close(out, x)
    out.sum().backward()
    assert branch.weight.grad is not None
    assert branch.weight.grad.abs().sum() == 0


def test_plain_add_without_drop_path_or_in_eval():
    branch = nn.Linear(6, 6)
    x = torch.randn(4, 6)
    for drop in (nn.Identity(), DropPath(0.5).eval()):
        torch.testing.assert_close(residual_kept(x, branch, x, drop),
                                   x + branch(x))


def test_accelerated_backbone_trains_with_drop_path():
    fast = _model(drop_path_rate=0.5).backbone
    accelerate(fast)
    fast.train()
    torch.manual_seed(1)
    out = fast(torch.randn(4, 3, 224, 224))[0]
    out.mean().backward()
    assert all(p.grad is not None for p in fast.parameters())
