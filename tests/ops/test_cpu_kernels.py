"""The C++ CPU implementation of the operator (``mmbiformer/ops/csrc``)
computes what the dense reference computes, at every region size the
kernels treat differently and at each pinned capability level."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from mmbiformer.ops import BiLevelRoutingAttention, cpu_ext
from mmbiformer.ops.bra import bra_forward

from .helpers import fwd_bwd, make_maps, run_backends

LINUX_X86 = platform.system() == 'Linux' and platform.machine() == 'x86_64'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_kernels_build_here():
    # the project's CI runs on Linux x86-64 with a compiler: a failed build
    # there must fail a test, not silently fall back
    if not LINUX_X86:
        pytest.skip('kernels are built on Linux x86-64 only')
    assert cpu_ext.load() is not None


needs_kernels = pytest.mark.skipif(
    not (LINUX_X86 and cpu_ext.available()),
    reason='C++ CPU kernels unavailable')

# (n, heads, n_win, rh, rw, topk, d, dv)
KERNEL_CASES = [
    (2, 2, 7, 2, 2, 3, 32, 32),   # 4-token regions, 12 keys (< 16)
    (1, 1, 5, 3, 2, 4, 16, 48),   # 3x2 regions: 6 queries (tail 2)
    (2, 2, 4, 3, 3, 5, 64, 32),   # 9-token regions, 45 keys
    (1, 4, 2, 4, 4, 4, 16, 16),   # topk = all regions
    # region sizes dividing 16: logits from grouped key copies, the routed
    # regions padded with zero blocks to a multiple of 16 keys
    (2, 2, 4, 2, 2, 5, 48, 16),   # 4 tokens, d != dv, 5 of 8 blocks
    (1, 1, 3, 2, 4, 4, 32, 32),   # 2x4 = 8 tokens
    (1, 2, 4, 1, 2, 6, 16, 16),   # 1x2 = 2 tokens, 6 of 8 blocks
    (1, 2, 2, 4, 4, 3, 16, 32),   # 4x4 = 16 tokens (rows), 3 routed
    # regions of more than 16 tokens: logits from a transposed key copy
    (1, 2, 2, 8, 8, 1, 32, 32),   # 64-token regions, one routed
    (1, 1, 2, 5, 5, 1, 16, 32),   # 25 tokens: padded keys, tail query
    (1, 2, 2, 8, 10, 2, 32, 16),  # 8x10 regions, 160 keys, d != dv
]


@needs_kernels
@pytest.mark.parametrize('case', KERNEL_CASES)
def test_kernels_match_reference(case):
    maps, graph = make_maps(*case)
    ref, grad = fwd_bwd(maps, graph, case[1], 'reference', scale=0.3)
    got, _ = fwd_bwd(maps, graph, case[1], 'cpu', grad, scale=0.3)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=1e-5)
    for a, e in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize('layout', ['slice', 'permuted'])
def test_opcheck_cpu_kernels(layout):
    maps, graph = make_maps(2, 2, 2, 2, 3, 2, 16, 16)

    def lay(t):
        if layout == 'slice':
            return t
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = (lay(t).detach().requires_grad_() for t in maps)
    torch.library.opcheck(bra_forward, (q, k, v, graph.topk_index, None, 2, 2,
                                        0.4, 'cpu'))


@needs_kernels
def test_layer_with_cpu_kernels_matches_reference():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=4, topk=3,
                                auto_pad=True)
    x = torch.randn(2, 10, 13, 64)
    grad = torch.randn(2, 10, 13, 64)
    (y, gx, gp, info), (y_ref, gx_ref, gp_ref, info_ref) = run_backends(
        m, x, grad, ['cpu', 'reference'])
    assert torch.equal(info['topk_index'], info_ref['topk_index'])
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=5e-5, rtol=1e-4)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=2e-4,
                                   rtol=1e-4)


def test_switch_off(monkeypatch):
    monkeypatch.setenv(cpu_ext.ENV_SWITCH, '0')
    assert cpu_ext.load() is None


PINNED = r'''
import sys
import torch
from mmbiformer.ops import bra_torch, cpu_bra, cpu_ext, implementation
sys.path.insert(0, "tests/ops")
from helpers import fwd_bwd, make_maps

assert cpu_ext.capability() == "{level}", cpu_ext.capability()
assert cpu_ext.load() is not None
maps, graph = make_maps(1, 2, 4, 2, 2, 3, 16, 16)
auto = implementation("cpu", "auto", maps[0], maps[2], 2, None)
assert auto is ({auto}), auto
assert implementation("cpu", "cpu", maps[0], maps[2], 2, None) is cpu_bra
for case in {cases!r}:  # every region size the kernels treat apart
    maps, graph = make_maps(*case)
    ref, grad = fwd_bwd(maps, graph, case[1], "reference", scale=0.3)
    got, _ = fwd_bwd(maps, graph, case[1], "cpu", grad, scale=0.3)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=1e-5)
print("ok")
'''


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize('level,auto', [('avx2', 'cpu_bra')])
def test_pinned_capability_level(level, auto):
    """``ATEN_CPU_CAPABILITY`` pins the kernels' code to that level (a
    build of its own, 8-lane at AVX2): they still compute the reference
    at every case above, and ``auto`` takes them there."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=level)
    script = PINNED.format(level=level, auto=auto, cases=KERNEL_CASES)
    proc = subprocess.run([sys.executable, '-c', script],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and 'ok' in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:]


@needs_kernels
def test_saved_tensors_do_not_depend_on_the_implementation():
    """The operator saves the same tensors whichever implementation runs
    (the C++ backward does not read the output, the portable one does):
    torch.compile's on-disk cache of the traced backward cannot tell the
    capability levels apart, so a graph traced at AVX-512 must also work
    at AVX2 (it once got ``None`` for the output there)."""
    maps, graph = make_maps(1, 2, 2, 2, 2, 2, 16, 16)
    q, k, v = (t.detach().requires_grad_() for t in maps)
    saved = {}
    for backend in ('cpu', 'torch'):
        shapes = saved.setdefault(backend, [])
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, shapes=shapes: shapes.append(tuple(t.shape)) or t,
                lambda t: t):
            bra_forward(q, k, v, graph.topk_index, None, 2, 2, 0.4, backend)
    assert saved['torch'] == saved['cpu']
    assert tuple(v.shape) in saved['cpu']  # the output among them
