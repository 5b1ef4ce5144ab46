"""Functional core: every backend against the dense ``reference``."""
import random

import pytest
import torch

from mmbiformer.ops import RegionGraph, bra_attention, region_mean, route
from mmbiformer.ops.fused_cpu import fused_attention

BACKENDS = ('official', 'gather', 'fused')


def make_case(seed, dtype=torch.float32, masked=False):
    """Random BRA problem: batch 1-4, heads 1-16, regions 1x1..13x21."""
    g = random.Random(seed)
    b = g.randint(1, 4)
    heads = g.choice([1, 2, 3, 4, 8, 16])
    n_win = g.randint(1, 4)
    r = n_win * n_win
    rh, rw = g.choice([(1, 1), (1, 3), (2, 2), (3, 5), (4, 4), (7, 2),
                       (13, 21), (5, 7)])
    if rh * rw > 100:  # keep the big regions cheap
        b, heads, n_win, r = 1, min(heads, 2), 2, 4
    t = rh * rw
    topk = g.randint(1, r)
    d = g.choice([4, 8, 16])
    dv = g.choice([d, 8])
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rnd(b, heads, r, t, d), rnd(b, heads, r, t, d), rnd(
        b, heads, r, t, dv)
    idx = torch.rand(b, r, r, generator=gen).topk(topk, dim=-1).indices
    key_mask = None
    if masked:
        key_mask = torch.rand(b, r, t, generator=gen) > 0.3
        key_mask[..., 0] = True  # every region keeps a valid key
    return q, k, v, idx, key_mask


def run(backend, q, k, v, idx, key_mask, scale=None, grad=None):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = bra_attention(q, k, v, idx, scale=scale, backend=backend,
                        key_mask=key_mask)
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad, grad


@pytest.mark.parametrize('backend', BACKENDS + ('auto', ))
@pytest.mark.parametrize('seed', range(12))
def test_backends_match_reference_fp32(backend, seed):
    case = make_case(seed, masked=seed % 3 == 0)
    ref = run('reference', *case)
    got = run(backend, *case, grad=ref[-1])
    for name, a, e in zip(('out', 'dq', 'dk', 'dv'), got[:4], ref[:4]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype,atol', [(torch.float16, 5e-3),
                                        (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize('seed', [1, 4, 6])
def test_half_precision(backend, dtype, atol, seed):
    """Low precision vs the float64 reference: |err| <= atol (+ rtol 2%)."""
    q, k, v, idx, km = make_case(seed, dtype=dtype, masked=seed == 6)
    ref = run('reference', q.double(), k.double(), v.double(), idx, km)
    got = run(backend, q, k, v, idx, km, grad=ref[-1].to(dtype))
    for a, e in zip(got[:4], ref[:4]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=2e-2)


@pytest.mark.parametrize('flash', [True, False])
def test_fused_chunking_is_exact(flash, monkeypatch):
    import mmbiformer.ops.fused_cpu as fused_cpu
    if not flash:  # force the explicit matmul/softmax path
        monkeypatch.setattr(fused_cpu, '_FLASH_DTYPES', ())
    q, k, v, idx, km = make_case(3, masked=True)
    assert q.shape[-1] == v.shape[-1] or not flash
    ref = run('reference', q, k, v, idx, km)
    for chunk_elems in (1, 300, 10**9):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = fused_attention(qq, kk, vv, RegionGraph(idx, k.shape[2], km),
                              scale=q.shape[-1]**-0.5,
                              chunk_elems=chunk_elems)
        out.backward(ref[-1])
        for a, e in zip((out, qq.grad, kk.grad, vv.grad), ref[:4]):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('backend', ['gather', 'fused'])
@pytest.mark.parametrize('masked', [False, True])
def test_gradcheck_float64(backend, masked):
    torch.manual_seed(0)
    b, h, nw, t, d = 2, 2, 2, 3, 4
    r = nw * nw
    q, k, v = (torch.randn(b, h, r, t, d, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    idx = torch.rand(b, r, r).topk(2, dim=-1).indices
    km = None
    if masked:
        km = torch.rand(b, r, t) > 0.4
        km[..., 0] = True

    def fn(q, k, v):
        return bra_attention(q, k, v, idx, scale=0.7, backend=backend,
                             key_mask=km)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fused_uses_fused_function_and_no_topk_copy_in_graph():
    q, k, v, idx, _ = make_case(2)
    q.requires_grad_()
    out = bra_attention(q, k, v, idx, backend='fused')
    assert type(out.grad_fn).__name__ == 'BRAFusedAttentionBackward'


def test_scale_and_custom_graph_object():
    q, k, v, idx, km = make_case(5, masked=True)
    graph = RegionGraph(idx, k.shape[2], km)
    a = bra_attention(q, k, v, graph, scale=0.3, backend='gather')
    b = bra_attention(q, k, v, idx, scale=0.3, backend='reference',
                      key_mask=km)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    c = bra_attention(q, k, v, graph, scale=0.9, backend='gather')
    assert not torch.allclose(a, c, atol=1e-3)


def test_region_graph_dense_mask():
    idx = torch.tensor([[[2, 0], [1, 3], [3, 2], [0, 1]]])
    g = RegionGraph(idx, 4)
    m = g.dense_region_mask()
    assert m.sum().item() == 8
    assert m[0, 0].tolist() == [True, False, True, False]


def test_route_and_region_mean():
    x = torch.arange(24, dtype=torch.float32).view(1, 2, 3, 4)
    torch.testing.assert_close(region_mean(x), x.mean(2))
    mask = torch.tensor([[[True, False, False], [True, True, True]]])
    torch.testing.assert_close(region_mean(x, mask)[0, 0], x[0, 0, 0])
    qr = torch.randn(2, 5, 8)
    kr = torch.randn(2, 5, 8)
    logits, idx = route(qr, kr, topk=3, scale=0.5)
    torch.testing.assert_close(logits, 0.5 * qr @ kr.transpose(1, 2))
    assert torch.equal(idx, logits.topk(3, dim=-1).indices)
    valid = torch.tensor([[True, True, False, True, True]])
    _, idx = route(qr, kr, topk=4, scale=0.5, kv_region_valid=valid)
    assert not (idx == 2).any()


def test_errors():
    q, k, v, idx, _ = make_case(0)
    with pytest.raises(ValueError, match='backend'):
        bra_attention(q, k, v, idx, backend='flash')
    with pytest.raises(ValueError, match='topk'):
        RegionGraph(torch.zeros(1, 4, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match='topk'):
        route(torch.randn(1, 4, 8), torch.randn(1, 4, 8), topk=5, scale=1.)
    with pytest.raises(ValueError, match='int64'):
        RegionGraph(idx.int(), k.shape[2])
    with pytest.raises(ValueError, match='5-D'):
        bra_attention(q[0], k, v, idx)
    with pytest.raises(ValueError, match='topk_index'):
        bra_attention(q, k, v, idx[:, :-1] if idx.shape[1] > 1 else
                      idx.repeat(1, 2, 1))
