"""The fused backend's token-order dense mode (small maps): which maps take
it, and that it computes the reference function (values, gradients of the
input and the weights, half precision, FLOP count)."""
import pytest
import torch

from mmbiformer.ops import BiLevelRoutingAttention, fused_cpu

from .helpers import run_backends
from .test_flops import traced_matmul_flops


class Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        apply = fused_cpu.BRATokenDenseAttention.apply

        def counted(*args):
            self.calls += 1
            return apply(*args)
        monkeypatch.setattr(fused_cpu.BRATokenDenseAttention, 'apply',
                            counted)


@pytest.mark.parametrize('hw,n_win,topk,expect', [
    ((14, 14), 7, 16, True),    # BiFormer stage 3 at 224
    ((28, 28), 7, 16, True),
    ((28, 28), 7, 4, False),    # 49 regions > 4 * topk
    ((56, 56), 7, 16, False),   # 49 * 64 keys > DENSE_MAX_KEYS
])
def test_which_maps_take_the_token_order_path(monkeypatch, hw, n_win, topk,
                                              expect):
    counter = Counter(monkeypatch)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=n_win, topk=topk,
                                backend='fused')
    _, info = m(torch.randn(1, *hw, 64), return_routing=True)
    assert info['backend'] == 'fused'
    assert (counter.calls == 1) == expect


@pytest.mark.parametrize('hw,auto_pad', [((14, 14), False), ((15, 12), True)])
def test_values_and_all_gradients_match_reference(monkeypatch, hw,
                                                  auto_pad):
    counter = Counter(monkeypatch)
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=4, n_win=7, topk=13,
                                auto_pad=auto_pad, backend='fused')
    x = torch.randn(2, *hw, 64)
    g = torch.randn(2, *hw, 64)
    (y, gx, gp, info), (y_ref, gx_ref, gp_ref, info_ref) = run_backends(
        m, x, g, ('fused', 'reference'))
    assert counter.calls == 1
    assert torch.equal(info['topk_index'], info_ref['topk_index'])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=1e-4, rtol=1e-4,
                                   msg=k)


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])
def test_half_precision(monkeypatch, dtype, tol):
    """Under autocast, against the reference backend under the same
    autocast (same routing; float32 differs by routing flips of near
    ties, which the backbone tests bound)."""
    counter = Counter(monkeypatch)
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=16,
                                backend='fused')
    x = torch.randn(2, 14, 14, 64)
    out = {}
    for backend in ('fused', 'reference'):
        m.backend = backend
        with torch.autocast('cpu', dtype=dtype):
            out[backend] = m(x, return_routing=True)
    assert counter.calls == 1
    (y, info), (y_ref, info_ref) = out['fused'], out['reference']
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.equal(info['topk_index'], info_ref['topk_index'])
    err = (y.float() - y_ref.float()).abs().max() / y_ref.abs().max()
    assert err < tol, float(err)


def test_counts_official_flops():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(32, num_heads=4, n_win=3, topk=3,
                                backend='official').eval()
    x = torch.randn(2, 9, 9, 32)
    official = traced_matmul_flops(m, x)
    m.backend = 'fused'
    assert traced_matmul_flops(m, x) == official


def test_auto_decides_on_the_head_dim(monkeypatch):
    """``auto`` is resolved on the per-head layout ``(..., heads,
    head_dim)``: whether the Triton kernel supports a tensor depends on the
    head dim (32 here), not on the total qk_dim (256)."""
    from mmbiformer.ops import module
    seen = []

    def fake_select(q):
        seen.append(tuple(q.shape))
        return 'reference'
    monkeypatch.setattr(module, 'select_backend', fake_select)
    m = BiLevelRoutingAttention(256, num_heads=8, n_win=7, topk=4)
    _, info = m(torch.randn(1, 14, 14, 256), return_routing=True)
    assert seen == [(1, 14, 14, 8, 32)]
    assert info['backend'] == 'reference'
