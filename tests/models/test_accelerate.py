"""accelerate(model): BiFormer backbones only, the state dict unchanged,
the same outputs and gradients."""
import copy

import pytest
import torch
import torch.nn as nn
from mini_arch import MINI

from mmbiformer.models import BiFormer, BiFormerBlock
from mmbiformer.models import accelerate as model_acc
from mmbiformer.models.accelerate import AcceleratedBlock, accelerate
from mmbiformer.ops import accelerate as op_acc
from mmbiformer.ops.accelerate import AcceleratedLinear, AcceleratedMlp


class _Net(nn.Module):
    # a BiFormer backbone with a linear head that is not part of it

    def __init__(self):
        super().__init__()
        self.backbone = BiFormer(arch=dict(MINI), out_indices=(3, ))
        self.head = nn.Linear(256, 5)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return _Net()


def test_only_biformer_backbones_and_state_dict_kept():
    plain = _model()
    fast = copy.deepcopy(plain)
    counts = accelerate(fast)
    assert counts['backbones'] == 1 and counts['modules'] > 0
    assert type(fast.head) is nn.Linear  # the head is not a BiFormer's
    blocks = [m for m in fast.modules() if isinstance(m, BiFormerBlock)]
    assert len(blocks) == 5
    assert all(type(b) is AcceleratedBlock for b in blocks)
    assert all(type(b.mlp) is AcceleratedMlp for b in blocks)
    assert all(type(b.mlp[0]) is AcceleratedLinear for b in blocks)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    _model().load_state_dict(fast.state_dict())
    assert accelerate(fast) == {'backbones': 1, 'modules': 0}


@pytest.mark.parametrize('mode', ['eval', 'train', 'train-fused'])
def test_same_outputs_and_gradients(mode, monkeypatch):
    # 'train-fused': the AVX-512 training operators forced on whatever this
    # machine's level, with drop path (the same random draws either way)
    fused = mode == 'train-fused'
    for module in (op_acc, model_acc):
        monkeypatch.setattr(module, 'training_fusions', lambda x: fused)
    torch.manual_seed(0)
    plain = BiFormer(arch=dict(MINI), out_indices=(3, ),
                     drop_path_rate=0.3 if fused else 0.)
    fast = copy.deepcopy(plain)
    accelerate(fast)
    getattr(plain, 'eval' if mode == 'eval' else 'train')()
    getattr(fast, 'eval' if mode == 'eval' else 'train')()
    x = torch.randn(2, 3, 224, 224)
    if mode == 'eval':
        with torch.no_grad():
            torch.testing.assert_close(fast(x), plain(x), atol=1e-4,
                                       rtol=1e-4)
        return
    torch.manual_seed(1)
    (plain(x)[0] ** 2).mean().backward()
    torch.manual_seed(1)
    (fast(x)[0] ** 2).mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3,
                                   msg=name)


@pytest.mark.parametrize('fused', [False, True])
def test_partly_dropped_branches_run_for_kept_samples(fused, monkeypatch):
    # a branch whose drop path drops some samples runs for the others
    # only; outputs and gradients are the whole-batch block's
    for module in (op_acc, model_acc):
        monkeypatch.setattr(module, 'training_fusions', lambda x: fused)
    calls = []
    add_kept = model_acc._add_kept

    def counting(x, kept, *args):
        calls.append(kept.numel())
        return add_kept(x, kept, *args)

    monkeypatch.setattr(model_acc, '_add_kept', counting)
    torch.manual_seed(0)
    plain = BiFormer(arch=dict(MINI), out_indices=(3, ),
                     drop_path_rate=0.6).train()
    fast = copy.deepcopy(plain)
    accelerate(fast)
    x = torch.randn(4, 3, 112, 112)
    torch.manual_seed(3)
    (plain(x)[0] ** 2).mean().backward()
    torch.manual_seed(3)
    (fast(x)[0] ** 2).mean().backward()
    assert any(0 < n < 4 for n in calls), calls
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3,
                                   msg=name)


def test_fully_dropped_branch_still_gives_gradients(monkeypatch):
    # every sample dropped: the branch runs on an empty batch, so that its
    # parameters get zero gradients (DDP expects one for every parameter)
    monkeypatch.setattr(model_acc.DropPath, 'sample_factors',
                        lambda self, x: x.new_zeros((x.shape[0], ) +
                                                    (1, ) * (x.dim() - 1)))
    torch.manual_seed(0)
    block = BiFormer(arch=dict(MINI), out_indices=(3, ),
                     drop_path_rate=0.5).train()
    accelerate(block)
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    block(x)[0].sum().backward()
    last = [m for m in block.modules() if isinstance(m, AcceleratedBlock)][-1]
    for name, p in last.named_parameters():
        if name.startswith(('attn', 'mlp')):
            assert p.grad is not None and not p.grad.any(), name


def test_kept_samples_only_in_eager_cpu_code():
    factors = torch.tensor([2., 0., 2.])
    assert model_acc.kept_samples(factors).tolist() == [0, 2]
    assert model_acc.kept_samples(torch.full((3, ), 2.)) is None
    assert model_acc.kept_samples(None) is None
    assert model_acc.kept_samples(factors.to('meta')) is None


def test_plain_block_under_cpu_autocast(monkeypatch):
    # under autocast the accelerated blocks compute as the plain ones (no
    # kept-samples branches): the same bfloat16 outputs, the same draws
    calls = []
    monkeypatch.setattr(model_acc, '_add_kept',
                        lambda *args: calls.append(1))
    torch.manual_seed(0)
    plain = BiFormer(arch=dict(MINI), out_indices=(3, ),
                     drop_path_rate=0.6).train()
    fast = copy.deepcopy(plain)
    accelerate(fast)
    x = torch.randn(4, 3, 112, 112, requires_grad=True)
    outs = []
    for model in (plain, fast):
        torch.manual_seed(3)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs.append(model(x)[0])
    assert not calls
    torch.testing.assert_close(outs[1], outs[0])
