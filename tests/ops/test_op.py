"""The registered BRA operator and its functional entry ``bra``: every
implementation equals the dense reference, passes ``opcheck``, and the
choice of implementation is made in one place with clear errors."""
import pytest
import torch

from mmbiformer.ops import (
    RegionGraph,
    bra,
    bra_torch,
    cpu_bra,
    cpu_ext,
    implementation,
    region_graph,
    region_means,
    route,
)
from mmbiformer.ops.bra import bra_forward

from .helpers import fwd_bwd, make_maps

# (n, heads, n_win, rh, rw, topk, d, dv, masked)
CASES = [
    (2, 2, 3, 2, 2, 4, 16, 16, False),   # 2x2-token regions (dense mode)
    (1, 1, 4, 4, 5, 3, 16, 32, False),   # 4x5 regions, dv != d
    (2, 3, 2, 1, 3, 2, 8, 8, True),      # 1x3 regions, masked keys
    (1, 2, 3, 1, 1, 9, 4, 4, True),      # 1x1 regions, topk = all
    (1, 1, 2, 8, 8, 1, 16, 16, False),   # 64-token regions
    (2, 2, 7, 8, 8, 1, 32, 32, False),   # BiFormer stage 1 at 224
]
PORTABLE = ['torch', 'official']


def _ids(case):
    n, m, nw, rh, rw, k, d, dv, masked = case
    return f'n{n}h{m}w{nw}r{rh}x{rw}k{k}d{d}v{dv}' + ('m' if masked else '')


@pytest.mark.parametrize('case', CASES, ids=_ids)
@pytest.mark.parametrize('backend', PORTABLE + ['auto'])
def test_backends_match_reference_fp32(backend, case):
    maps, graph = make_maps(*case[:8], masked=case[8])
    heads = case[1]
    ref, grad = fwd_bwd(maps, graph, heads, 'reference')
    got, _ = fwd_bwd(maps, graph, heads, backend, grad)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('dtype,atol', [(torch.bfloat16, 3e-2),
                                        (torch.float16, 5e-3)])
@pytest.mark.parametrize('case', CASES[:3], ids=_ids)
def test_portable_half_precision(case, dtype, atol):
    maps, graph = make_maps(*case[:8], masked=case[8], dtype=dtype)
    ref, grad = fwd_bwd([t.float() for t in maps], graph, case[1],
                        'reference')
    got, _ = fwd_bwd(maps, graph, case[1], 'torch', grad.to(dtype))
    for a, e in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e, atol=atol, rtol=atol)


@pytest.mark.parametrize('flash', [True, False])
def test_chunking_is_exact(flash, monkeypatch):
    """Chunks of one group each give the result of one chunk of all."""
    maps, graph = make_maps(2, 2, 2, 4, 4, 2, 16, 16, masked=True)
    monkeypatch.setattr(bra_torch, 'DENSE_MAX_KEYS', 0)
    monkeypatch.setattr(bra_torch, 'FLASH_MIN_KEYS', 0 if flash else 10**9)
    whole, grad = fwd_bwd(maps, graph, 2, 'torch')
    monkeypatch.setattr(bra_torch, 'CHUNK_ELEMS', 1)
    chunked, _ = fwd_bwd(maps, graph, 2, 'torch', grad)
    for a, e in zip(chunked, whole):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('dense', [True, False])
@pytest.mark.parametrize('masked', [False, True])
def test_gradcheck_float64(dense, masked, monkeypatch):
    if not dense:
        monkeypatch.setattr(bra_torch, 'DENSE_MAX_KEYS', 0)
    maps, graph = make_maps(1, 2, 2, 2, 2, 2, 4, 4, masked=masked,
                            dtype=torch.float64)
    maps = [t.detach().requires_grad_() for t in maps]
    assert torch.autograd.gradcheck(
        lambda q, k, v: bra(q, k, v, graph, 2, scale=0.5, backend='torch'),
        maps)


def _opcheck_inputs(maps, graph, heads, backend, layout):
    def lay(t):
        if layout == 'compact':
            return t.contiguous()
        if layout == 'slice':  # views of one qkv map, as the layer has them
            return t
        # dense but permuted: (N, W, H, C) memory seen as (N, H, W, C)
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = (lay(t).detach().requires_grad_() for t in maps)
    return (q, k, v, graph.topk_index, graph.key_valid, graph.n_win, heads,
            0.4, backend)


@pytest.mark.parametrize('layout', ['compact', 'slice', 'permuted'])
@pytest.mark.parametrize('backend,masked', [('torch', False),
                                            ('torch', True),
                                            ('auto', False)])
def test_opcheck(backend, masked, layout):
    maps, graph = make_maps(2, 2, 2, 3, 2, 2, 16, 16, masked=masked)
    torch.library.opcheck(
        bra_forward, _opcheck_inputs(maps, graph, 2, backend, layout))


def test_opcheck_chunked_strategy(monkeypatch):
    monkeypatch.setattr(bra_torch, 'DENSE_MAX_KEYS', 0)
    maps, graph = make_maps(1, 2, 2, 2, 4, 2, 8, 8, masked=True)
    torch.library.opcheck(
        bra_forward, _opcheck_inputs(maps, graph, 2, 'torch', 'permuted'))


def test_empty_batch():
    maps, graph = make_maps(2, 2, 2, 2, 2, 2, 16, 16)
    empty = [t[:0] for t in maps]
    graph = RegionGraph(graph.topk_index[:0], 2)
    for backend in PORTABLE + ['auto', 'reference']:
        got, _ = fwd_bwd(empty, graph, 2, backend)
        assert got[0].shape == (0, 4, 4, 32)
        assert all(g.shape == t.shape for g, t in zip(got[1:], empty))


# ------------------------------------------------------------ the choice

def test_auto_takes_the_cpu_kernels_at_avx512_and_avx2(monkeypatch):
    maps, graph = make_maps(1, 2, 2, 2, 2, 2, 16, 16)
    q, _, v = maps
    monkeypatch.setattr(cpu_ext, 'load', lambda verbose=False: object())
    monkeypatch.setattr(cpu_ext, 'capability', lambda: 'default')
    assert implementation('cpu', 'auto', q, v, 2, None) is bra_torch
    monkeypatch.setattr(cpu_ext, 'capability', lambda: 'avx2')
    assert implementation('cpu', 'auto', q, v, 2, None) is cpu_bra
    monkeypatch.setattr(cpu_ext, 'capability', lambda: 'avx512')
    assert implementation('cpu', 'auto', q, v, 2, None) is cpu_bra
    # where they do not apply, 'auto' takes the portable code...
    assert implementation('cpu', 'auto', q, v, 2,
                          torch.ones(4, 4, dtype=torch.bool)) is bra_torch
    assert implementation('cpu', 'auto', q.double(), v.double(), 2,
                          None) is bra_torch
    assert implementation('cpu', 'auto', q, v, 4, None) is bra_torch
    # ...and the named backend is an error that says why
    with pytest.raises(ValueError, match='multiples of 16'):
        implementation('cpu', 'cpu', q, v, 4, None)
    with pytest.raises(ValueError, match='key mask'):
        implementation('cpu', 'cpu', q, v, 2,
                       torch.ones(4, 4, dtype=torch.bool))
    assert implementation('cpu', 'torch', q, v, 2, None) is bra_torch


def test_cpu_backend_on_another_device_is_an_error():
    q = torch.zeros(1, 4, 4, 32)
    with pytest.raises(ValueError, match="backend='cpu'.*on cpu|tensors"):
        implementation('cuda', 'cpu', q, q, 2, None)
    assert implementation('other', 'auto', q, q, 2, None) is bra_torch


def test_without_kernels_everything_runs_the_portable_code(monkeypatch):
    monkeypatch.setattr(cpu_ext, 'load', lambda verbose=False: None)
    monkeypatch.setattr(cpu_ext, 'capability', lambda: 'avx512')
    maps, graph = make_maps(1, 2, 2, 2, 2, 2, 16, 16)
    q, _, v = maps
    assert implementation('cpu', 'auto', q, v, 2, None) is bra_torch
    with pytest.raises(ValueError, match='could not be built'):
        implementation('cpu', 'cpu', q, v, 2, None)
    ref, grad = fwd_bwd(maps, graph, 2, 'reference')
    got, _ = fwd_bwd(maps, graph, 2, 'auto', grad)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)


def test_unknown_and_renamed_backends():
    maps, graph = make_maps(1, 2, 2, 2, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="choose one of"):
        bra(*maps, graph, 2, backend='flash')
    with pytest.raises(ValueError, match="'fused' was merged into 'torch'"):
        bra(*maps, graph, 2, backend='fused')


def test_shape_errors():
    maps, graph = make_maps(2, 2, 2, 2, 2, 2, 16, 16)
    q, k, v = maps
    with pytest.raises(ValueError, match=r'\(N, H, W, heads \* d\)'):
        bra(q[0], k, v, graph, 2)
    with pytest.raises(ValueError, match='heads=3 must divide'):
        bra(q, k, v, graph, 3)
    with pytest.raises(ValueError, match='dtypes differ'):
        bra(q, k.double(), v, graph, 2)
    with pytest.raises(ValueError, match='not n_win=2 regions'):
        bra(q[:, :3], k[:, :3], v[:, :3], graph, 2)
    with pytest.raises(ValueError, match='for 1 images'):
        bra(q, k, v, RegionGraph(graph.topk_index[:1], 2), 2)
    with pytest.raises(ValueError, match='int64'):
        RegionGraph(graph.topk_index.int(), 2)
    with pytest.raises(ValueError, match='n_win=3 makes 9'):
        RegionGraph(graph.topk_index, 3)
    with pytest.raises(ValueError, match='topk=5'):
        RegionGraph(torch.zeros(1, 4, 5, dtype=torch.long), 2)


# --------------------------------------------------------------- routing

def test_region_means_and_route():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 3)
    means = region_means(x, 2)
    expected = x.view(2, 2, 3, 2, 2, 3).mean((2, 4)).reshape(2, 4, 3)
    torch.testing.assert_close(means, expected)
    valid = torch.zeros(6, 4, dtype=torch.bool)
    valid[0, 0] = True  # region 0: one valid token; the others: none
    masked = region_means(x, 2, valid)
    torch.testing.assert_close(masked[:, 0], x[:, 0, 0])
    assert masked[:, 1:].abs().max() == 0
    logits, idx = route(means, means, 2, 0.5)
    torch.testing.assert_close(logits, 0.5 * means @ means.transpose(1, 2))
    assert torch.equal(idx, logits.topk(2, dim=-1).indices)
    with pytest.raises(ValueError, match='impossible'):
        route(means, means, 5, 1.0)


def test_region_graph_leaves_padding_out():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[2:] = False  # the bottom row of regions is padding
    graph = region_graph(q, k, 2, 4, 1.0, valid)
    assert graph.key_valid is valid
    assert torch.isinf(graph.routing_logits[..., 2:]).all()
    # the padded regions are routed to last
    assert set(graph.topk_index[0, :, :2].flatten().tolist()) <= {0, 1}
    assert graph.dense_region_mask().sum() == 4 * 4
