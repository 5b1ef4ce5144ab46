"""The fused backend's chunked path runs attention either with torch's CPU
flash kernel (long routed key sequences) or with matmuls (short ones); both
must compute the reference function, values and gradients."""
import pytest
import torch

from mmbiformer.ops import bra_attention, fused_cpu


@pytest.mark.parametrize('tokens,topk,expect_flash', [
    (64, 4, True),     # 256 routed keys: flash kernel
    (64, 1, False),    # 64 keys (BiFormer stage 1 at 224): matmuls
    (16, 4, False),    # 64 keys (stage 2): matmuls
])
def test_chunked_paths_match_reference(monkeypatch, tokens, topk,
                                       expect_flash):
    calls = []
    use_flash = fused_cpu._use_flash

    def spy(*args):
        calls.append(use_flash(*args))
        return calls[-1]
    monkeypatch.setattr(fused_cpu, '_use_flash', spy)
    torch.manual_seed(0)
    b, h, r, d = 2, 2, 25, 16  # 25 regions: not the dense mode
    q, k, v = (torch.randn(b, h, r, tokens, d, dtype=torch.float64
                           ).float().requires_grad_() for _ in range(3))
    idx = torch.stack([torch.randperm(r)[:topk] for _ in range(b * r)])
    idx = idx.view(b, r, topk)
    g = torch.randn(b, h, r, tokens, d)
    out = {}
    for backend in ('fused', 'reference'):
        y = bra_attention(q, k, v, idx, backend=backend)
        out[backend] = (y, *torch.autograd.grad(y, (q, k, v), g))
    assert calls == [expect_flash]
    for a, ref in zip(out['fused'], out['reference']):
        torch.testing.assert_close(a, ref, atol=2e-5, rtol=1e-4)
