"""Triton backend: on a GPU when there is one, else under the interpreter.

Without a GPU, ``conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is
imported. If something imported triton earlier in the session (so its
kernels were not built for the interpreter), these tests run again in a
fresh process instead (``test_in_fresh_process``).
"""
import os
import subprocess
import sys

import pytest
import torch

from mmbiformer.ops import BiLevelRoutingAttention
from mmbiformer.ops.bra import bra_forward

from .helpers import fwd_bwd, make_maps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
pytest.importorskip('triton', reason='triton is not installed')



def _kernels_interpreted() -> bool:
    """Whether triton's own library functions were built for the
    interpreter (decided when triton was first imported)."""
    import triton.language as tl
    return type(tl.standard.sum).__name__ == 'InterpretedFunction'


IN_PROCESS = DEVICE == 'cuda' or _kernels_interpreted()


@pytest.fixture(params=['inverted', 'atomic'])
def backward_kernels(request, monkeypatch):
    """Both backward variants of the Triton backend (see
    ``triton_bra.BACKWARD``)."""
    from mmbiformer.ops import triton_bra
    monkeypatch.setattr(triton_bra, 'BACKWARD', request.param)
    return request.param
needs_in_process = pytest.mark.skipif(
    not IN_PROCESS, reason='triton was imported before TRITON_INTERPRET=1 '
    'could be set; covered by test_in_fresh_process')


@pytest.mark.skipif(IN_PROCESS, reason='the tests run in this process')
def test_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         __file__], env=env, capture_output=True, text=True, timeout=600,
        cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

# (n, heads, n_win, rh, rw, topk, d, dv, masked)
CASES = [
    (1, 2, 2, 1, 3, 2, 8, 8, True),      # 1x3 regions, masked keys
    (2, 1, 2, 4, 5, 4, 16, 16, False),   # 4x5 regions: several key tiles
    (1, 1, 1, 7, 10, 1, 32, 16, False),  # several query blocks, dv != d
    (1, 3, 3, 1, 1, 9, 4, 4, True),      # 1x1 regions, topk = all
]


def make(case, dtype=torch.float32, seed=0):
    return make_maps(*case[:8], masked=case[8], dtype=dtype, device=DEVICE,
                     seed=seed)


def assert_triton_matches(case, oracle: str, atol: float) -> None:
    """float32 output and q/k/v gradients of `triton` equal `oracle`'s."""
    maps, graph = make(case)
    ref, grad = fwd_bwd(maps, graph, case[1], oracle)
    got, _ = fwd_bwd(maps, graph, case[1], 'triton', grad)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4)


@needs_in_process
@pytest.mark.parametrize('case', CASES)
def test_triton_matches_reference_fp32(case, backward_kernels):
    assert_triton_matches(case, 'reference', atol=1e-5)


@needs_in_process
@pytest.mark.parametrize('dtype,atol', [(torch.float16, 5e-3)])
def test_triton_half(dtype, atol):
    maps, graph = make(CASES[1], dtype)
    ref, grad = fwd_bwd([x.double() for x in maps], graph, 1, 'reference')
    got, _ = fwd_bwd(maps, graph, 1, 'triton', grad.to(dtype))
    for a, e in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=2e-2)


@needs_in_process
def test_triton_module_backend():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2,
                                auto_pad=True, pad_mode='masked').to(DEVICE)
    x = torch.randn(1, 5, 3, 16, device=DEVICE)
    m.backend = 'reference'
    ref = m(x)
    m.backend = 'triton'
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-4)


@needs_in_process
@pytest.mark.parametrize('masked', [False, True])
def test_opcheck_triton(masked):
    maps, graph = make((1, 2, 2, 2, 3, 2, 16, 16, masked))
    q, k, v = (t.detach().requires_grad_() for t in maps)
    torch.library.opcheck(bra_forward, (q, k, v, graph.topk_index,
                                        graph.key_valid, 2, 2, 0.4,
                                        'triton'))


@needs_in_process
@pytest.mark.parametrize('hw,topk,qk_dim', [((4, 6), 2, None),
                                            ((5, 3), 4, 32)])
def test_triton_token_order_matches_reference(hw, topk, qk_dim,
                                              backward_kernels):
    """The layer (q/k/v read in place from the qkv output): output and
    gradients of the input and of every parameter equal the reference
    backend's."""
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=topk,
                                qk_dim=qk_dim, auto_pad=True).to(DEVICE)
    x = torch.randn(2, *hw, 16, device=DEVICE)
    results = []
    for backend in ('reference', 'triton'):
        m.backend = backend
        m.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(torch.cos(y.detach()))
        results.append([y, xg.grad] + [p.grad for p in m.parameters()])
    for a, e in zip(*results[::-1]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@needs_in_process
@pytest.mark.parametrize('pad_mode', ['legacy', 'masked'])
def test_triton_empty_batch(pad_mode, backward_kernels):
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2,
                                auto_pad=True, pad_mode=pad_mode,
                                backend='triton').to(DEVICE)
    x = torch.randn(0, 5, 6, 16, device=DEVICE, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == (0, 5, 6, 16) and x.grad.shape == x.shape


# BiFormer's routed stages at 224 (n_win 7) and at a detection size
# (n_win 16, regions of 13 x 19 tokens): run on a GPU only, the
# interpreter would take minutes
STAGE_CASES = [
    (2, 2, 7, 8, 8, 1, 32, 32, False),     # stage 1 at 224: 8x8 regions
    (2, 4, 7, 4, 4, 4, 32, 32, False),     # stage 2
    (2, 8, 7, 2, 2, 16, 32, 32, False),    # stage 3: 2x2 regions
    (1, 2, 16, 13, 19, 1, 32, 32, True),   # stage 1 at 800x1216, padded
]
on_gpu = pytest.mark.skipif(DEVICE != 'cuda', reason='needs CUDA (the '
                            'interpreter is too slow for these sizes)')


@on_gpu
@pytest.mark.parametrize('case', STAGE_CASES)
def test_triton_stage_shapes_fp32(case, backward_kernels):
    assert_triton_matches(case, 'torch', atol=2e-5)


@on_gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('case', STAGE_CASES[:3])
def test_triton_stage_shapes_low_precision(case, dtype):
    """Half-precision kernels against the float32 result: errors of the
    order of the inputs' rounding, and never worse than `torch` in the
    same dtype by more than a small factor."""
    maps, graph = make(case)
    ref, grad = fwd_bwd(maps, graph, case[1], 'torch')
    low = [x.to(dtype) for x in maps]
    got, _ = fwd_bwd(low, graph, case[1], 'triton', grad.to(dtype))
    base, _ = fwd_bwd(low, graph, case[1], 'torch', grad.to(dtype))
    for a, b, e in zip(got, base, ref):
        assert a.dtype == dtype and torch.isfinite(a).all()
        err = (a.float() - e).abs().max().item()
        err_torch = (b.float() - e).abs().max().item()
        assert err <= 2 * err_torch + 1e-2, (err, err_torch)


@on_gpu
def test_auto_is_triton_on_cuda_and_matches_torch():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4,
                                auto_pad=True).to(DEVICE)
    x = torch.randn(2, 30, 44, 64, device=DEVICE, requires_grad=True)
    from mmbiformer.ops import implementation, triton_bra
    assert implementation('cuda', 'auto', x, x, 2, None) is triton_bra
    y = m(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    m.backend = 'torch'
    y2 = m(x)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gx, x.grad, atol=2e-5, rtol=1e-4)


def test_inverted_routing_lists_every_router_once():
    from mmbiformer.ops.triton_bra import inverted_routing
    g = torch.Generator().manual_seed(0)
    b, r, s, k = 3, 6, 5, 2
    idx = torch.stack([torch.stack([torch.randperm(s, generator=g)[:k]
                                    for _ in range(r)]) for _ in range(b)])
    routers, start = inverted_routing(idx, s)
    assert routers.dtype == start.dtype == torch.int32
    assert routers.shape == (b, r * k) and start.shape == (b, s + 1)
    for bi in range(b):
        assert start[bi, 0] == 0 and start[bi, -1] == r * k
        for si in range(s):
            got = routers[bi, start[bi, si]:start[bi, si + 1]].tolist()
            want = [ri for ri in range(r) if si in idx[bi, ri].tolist()]
            assert got == want  # ascending, each router once


def test_backward_mode_follows_deterministic_algorithms(monkeypatch):
    from mmbiformer.ops import triton_bra
    monkeypatch.setattr(triton_bra, 'BACKWARD', 'auto')
    state = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert triton_bra.backward_mode() == 'atomic'
        torch.use_deterministic_algorithms(True)
        assert triton_bra.backward_mode() == 'inverted'
    finally:
        torch.use_deterministic_algorithms(state)
    monkeypatch.setattr(triton_bra, 'BACKWARD', 'inverted')
    assert triton_bra.backward_mode() == 'inverted'
    monkeypatch.setattr(triton_bra, 'BACKWARD', 'fast')
    with pytest.raises(ValueError, match="'atomic' or 'inverted'"):
        triton_bra.backward_mode()


@on_gpu
def test_deterministic_backward_is_bit_reproducible():
    """Under torch.use_deterministic_algorithms the attention's gradients
    are equal bit for bit from run to run (stage 3 at 224: every key region
    is routed to by many query regions)."""
    maps, graph = make((4, 8, 7, 2, 2, 16, 32, 32, False))
    grad = torch.randn(4, 14, 14, 256).to(DEVICE)
    state = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(3):
            got, _ = fwd_bwd(maps, graph, 8, 'triton', grad)
            grads.append(torch.cat(got[1:], dim=-1))
    finally:
        torch.use_deterministic_algorithms(state)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
