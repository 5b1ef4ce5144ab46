"""Bi-level routing attention as one operator on the torch dispatcher.

:func:`bra` is the functional entry: the token-to-token attention of BRA,
given the region graph of the routing level (:func:`~.routing.region_graph`).

Layouts (channels last, the map's own token order; ``L = H * W``, ``R =
n_win ** 2`` regions of ``T = (H / n_win) * (W / n_win)`` tokens):

* ``q``, ``k``: ``(N, H, W, heads * d)``; ``v``: ``(N, H, W, heads * dv)``;
  any strides with a unit channel stride (slices of one ``qkv``
  projection are read in place by the kernels);
* returns ``(N, H, W, heads * dv)``: for every query token, softmax over
  the ``topk * T`` tokens of its region's routed regions.

The operator is ``torch.ops.mmbiformer.bra_forward`` (output and per-query
log-sum-exp) with ``torch.ops.mmbiformer.bra_backward`` as its autograd
formula; both have fake implementations, so ``torch.compile`` and
``torch.export`` see one node each. The dispatcher picks the device's
registration, and that registration alone picks the implementation
(:func:`implementation`):

==========  ===============================================================
backend     implementation
==========  ===============================================================
``auto``    CPU: the C++ kernels (:mod:`~.cpu_bra`) at the AVX-512 and
            AVX2 capability levels where they apply, else ``torch``; CUDA:
            Triton (:mod:`~.triton_bra`) where it applies, else ``torch``
``cpu``     the C++ kernels (float32, head dims multiple of 16, no key
            mask); an error elsewhere
``triton``  the Triton kernels (CUDA, or the CPU under
            ``TRITON_INTERPRET=1``); an error elsewhere
``torch``   the portable implementation (:mod:`~.bra_torch`), any device
==========  ===============================================================

Three more backends are plain torch code, differentiated by autograd:
``reference`` (dense attention with a mask, the test oracle),
``official`` (the original algorithm, which copies the routed keys and
values top-k times: the compatibility baseline) and ``flex`` (torch's
FlexAttention with a block mask of the routing, :mod:`~.flex_bra`: a
candidate against the Triton kernels; forward only on the CPU).
"""
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import (
    FunctionalTensor,
    FunctionalTensorMode,
)

from . import bra_torch, cpu_bra, cpu_ext
from .routing import RegionGraph

__all__ = ['BACKENDS', 'bra', 'implementation', 'triton_available']

BACKENDS = ('auto', 'cpu', 'triton', 'torch', 'official', 'reference',
            'flex')
#: CPU capability levels where ``auto`` takes the C++ kernels: where they
#: were measured faster than the portable code (docs/benchmarks.md). At the
#: baseline level (SSE2) GCC compiles their 16-lane shuffles lane by lane.
_KERNEL_LEVELS = ('avx512', 'avx2')
#: backend names of earlier releases and what took their place
_RENAMED = {'fused': 'torch', 'gather': 'torch'}


def check_backend(backend: str) -> None:
    """A ``ValueError`` naming the choices for an unknown backend."""
    if backend in BACKENDS:
        return
    hint = ''
    if backend in _RENAMED:
        hint = (f"; {backend!r} was merged into {_RENAMED[backend]!r} (the "
                'portable implementation)')
    raise ValueError(f'backend={backend!r} is not supported{hint}; choose '
                     f'one of {BACKENDS}')


def triton_available(device: Optional[torch.device] = None) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with an
    importable ``triton``, or any device under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and torch.device(device).type == 'cuda':
        return True
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


# --------------------------------------------------------------- choice

def implementation(device: str, backend: str, q: Tensor, v: Tensor,
                   heads: int, key_valid: Optional[Tensor]):
    """The implementation module (:mod:`~.cpu_bra`, :mod:`~.triton_bra` or
    :mod:`~.bra_torch`) that ``backend`` runs on ``device`` (``'cpu'``,
    ``'cuda'`` or ``'other'``, the registration that asks) for these
    inputs; a ``ValueError`` where a named backend does not apply. The only
    place that chooses: forward and backward ask it alike."""
    if backend == 'torch':
        return bra_torch
    if backend == 'cpu' or (backend == 'auto' and device == 'cpu'):
        if backend == 'auto' and cpu_ext.capability() not in _KERNEL_LEVELS:
            return bra_torch
        why = (f'the tensors are on {q.device.type}' if device != 'cpu'
               else cpu_bra.applies(q, v, heads, key_valid))
        if why is None:
            return cpu_bra
        if backend == 'auto':
            return bra_torch
        raise ValueError(
            f"backend='cpu' (the C++ CPU kernels) does not apply: {why}. "
            "Use backend='auto' (or 'torch', the portable code).")
    if backend == 'auto' and device != 'cuda':
        return bra_torch
    # 'triton', or 'auto' on CUDA
    if triton_available(q.device):
        from . import triton_bra
        why = triton_bra.applies(q, v, heads)
        if why is None:
            return triton_bra
    else:
        why = (f'Triton cannot run on {q.device.type} tensors (CUDA, or '
               'TRITON_INTERPRET=1 for its interpreter)')
    if backend == 'auto':
        return bra_torch
    raise ValueError(f"backend='triton' does not apply: {why}. Use "
                     "backend='auto' (or 'torch', the portable code).")


# ------------------------------------------------------ the registered op

def _empty_forward(q: Tensor, v: Tensor, heads: int) -> Tuple[Tensor, Tensor]:
    n, h, w, _ = q.shape
    return (q.new_empty(n, h, w, v.shape[-1]),
            q.new_empty(n, heads, h * w, dtype=torch.float32))


def _forward(device: str, q: Tensor, k: Tensor, v: Tensor,
             topk_index: Tensor, key_valid: Optional[Tensor], n_win: int,
             heads: int, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    impl = implementation(device, backend, q, v, heads, key_valid)
    if q.shape[0] == 0:
        return _empty_forward(q, v, heads)
    return impl.forward(q, k, v, topk_index, key_valid, n_win, heads, scale)


def _backward(device: str, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
              out: Optional[Tensor], lse: Tensor, topk_index: Tensor,
              key_valid: Optional[Tensor], n_win: int, heads: int,
              scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = implementation(device, backend, q, v, heads, key_valid)
    if q.shape[0] == 0:
        return (q.new_zeros(q.shape), k.new_zeros(k.shape),
                v.new_zeros(v.shape))
    return impl.backward(grad_out, q, k, v, out, lse, topk_index, key_valid,
                         n_win, heads, scale)


@torch.library.custom_op('mmbiformer::bra_forward', mutates_args=())
def bra_forward(q: Tensor, k: Tensor, v: Tensor, topk_index: Tensor,
                key_valid: Optional[Tensor], n_win: int, heads: int,
                scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """Output ``(N, H, W, heads * dv)`` and log-sum-exp ``(N, heads, L)``
    float32 (in an order of the implementation's own)."""
    return _forward('other', q, k, v, topk_index, key_valid, n_win, heads,
                    scale, backend)


@torch.library.custom_op('mmbiformer::bra_backward', mutates_args=())
def bra_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 out: Optional[Tensor], lse: Tensor, topk_index: Tensor,
                 key_valid: Optional[Tensor], n_win: int, heads: int,
                 scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``q``, ``k``, ``v`` (contiguous, their shapes); ``out``
    is the forward's output (the C++ implementation does not read it and
    takes ``None`` too)."""
    return _backward('other', grad_out, q, k, v, out, lse, topk_index,
                     key_valid, n_win, heads, scale, backend)


def _register(device: str) -> None:
    @bra_forward.register_kernel(device)
    def _(q, k, v, topk_index, key_valid, n_win, heads, scale, backend):
        return _forward(device, q, k, v, topk_index, key_valid, n_win, heads,
                        scale, backend)

    @bra_backward.register_kernel(device)
    def _(grad_out, q, k, v, out, lse, topk_index, key_valid, n_win, heads,
          scale, backend):
        return _backward(device, grad_out, q, k, v, out, lse, topk_index,
                         key_valid, n_win, heads, scale, backend)


_register('cpu')
_register('cuda')


@bra_forward.register_fake
def _(q, k, v, topk_index, key_valid, n_win, heads, scale, backend):
    return _empty_forward(q, v, heads)


@bra_backward.register_fake
def _(grad_out, q, k, v, out, lse, topk_index, key_valid, n_win, heads,
      scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, topk_index, key_valid, n_win, heads, scale, backend = inputs
    out, lse = output
    # the output is kept whatever the implementation (the C++ backward does
    # not read it): torch.compile caches the traced backward on disk under
    # a key that does not see which implementation this machine's
    # capability level picks, so a graph traced at one level must work at
    # every other
    ctx.save_for_backward(q, k, v, out, lse, topk_index, key_valid)
    ctx.args = (n_win, heads, scale, backend)


def _autograd(ctx, grad_out: Tensor, grad_lse: Optional[Tensor]):
    q, k, v, out, lse, topk_index, key_valid = ctx.saved_tensors
    dq, dk, dv = bra_backward(grad_out, q, k, v, out, lse, topk_index,
                              key_valid, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


bra_forward.register_autograd(_autograd, setup_context=_setup_context)


# ------------------------------------ what torch.compile sees of the op
#
# Below autograd, AOTAutograd traces the graph under FunctionalTensorMode.
# Where the chosen implementation is Triton with traceable kernels (CUDA),
# the public operator is replaced there by the Triton implementation's own
# operators (``torch.library.triton_op``), which decompose into their
# kernels: inductor then sees and schedules those kernels. Everywhere else
# (the CPU, the interpreter, ``torch.export``) the operator stays one
# opaque node.

def _traced_implementation(q, v, key_valid, heads, backend):
    """The Triton module if the operator called on these inputs is to be
    decomposed into its kernels, else None."""
    try:
        from torch.export._trace import (
            custom_triton_ops_decomposition_disabled,
        )
        if custom_triton_ops_decomposition_disabled():
            return None
    except ImportError:  # pragma: no cover (other torch versions)
        pass
    device = q.device.type if q.device.type in ('cpu', 'cuda') else 'other'
    impl = implementation(device, backend, q, v, heads, key_valid)
    if impl.__name__.endswith('triton_bra') and impl.traceable():
        return impl
    return None


def _decompose(forward: bool):
    def rule(mode, op, types, args, kwargs):
        plain = (torch.Tensor, FunctionalTensor)
        if kwargs or any(not issubclass(t, plain) and
                         not issubclass(t, FakeTensor) for t in types):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        # forward: q, k, v, topk_index, key_valid, n_win, heads, scale,
        # backend; backward: grad_out first, out and lse after v
        q, v = (args[0], args[2]) if forward else (args[1], args[3])
        impl = _traced_implementation(q, v, args[-5], args[-3], args[-1])
        if impl is None or q.shape[0] == 0:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            if forward:
                return impl.forward(*args[:-1])
            return impl.backward(*args[:-1])
    return rule


bra_forward.register_torch_dispatch(FunctionalTensorMode, _decompose(True))
bra_backward.register_torch_dispatch(FunctionalTensorMode, _decompose(False))


# ------------------------------------------------- plain-torch backends

def _reference(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
               heads: int, scale: float) -> Tensor:
    """Dense attention over all ``L`` keys with the routing as a mask."""
    hw = (q.shape[1], q.shape[2])
    bias = bra_torch.dense_bias(graph.topk_index, graph.n_win, hw, q.dtype,
                                graph.key_valid)
    qh, kh, vh = (bra_torch._heads(t, heads) for t in (q, k, v))
    attn = F.softmax((qh * scale) @ kh.transpose(-2, -1) + bias, dim=-1)
    return bra_torch._unheads(attn @ vh, hw)


def _official(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
              heads: int, scale: float) -> Tensor:
    """The original algorithm: every query region's copy of the key/value
    regions (``expand``), the routed ones taken with ``gather``."""
    nw, idx = graph.n_win, graph.topk_index
    qr, kr, vr = (bra_torch._by_region(t, nw, heads) for t in (q, k, v))
    b, m, r, t, _ = qr.shape
    topk = idx.shape[-1]

    def select(x: Tensor) -> Tensor:
        c = x.shape[-1]
        expanded = x.unsqueeze(2).expand(b, m, r, r, t, c)
        index = idx.view(b, 1, r, topk, 1, 1).expand(b, m, r, topk, t, c)
        return torch.gather(expanded, 3, index).reshape(b, m, r, topk * t, c)

    logits = (qr * scale) @ select(kr).transpose(-2, -1)
    if graph.key_valid is not None:
        valid = rearrange(graph.key_valid, '(j y) (i x) -> (j i) (y x)',
                          j=nw, i=nw)
        valid = valid[idx].reshape(b, 1, r, 1, topk * t)
        logits = logits.masked_fill(~valid, float('-inf'))
    out = F.softmax(logits, dim=-1) @ select(vr)
    return bra_torch._from_region(out, nw, (q.shape[1], q.shape[2]))


# ------------------------------------------------------------ functional

def _check(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph,
           heads: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or \
            v.shape[:3] != q.shape[:3]:
        raise ValueError(
            'bra: q and k must be (N, H, W, heads * d) maps and v (N, H, W, '
            f'heads * dv), got {tuple(q.shape)}, {tuple(k.shape)}, '
            f'{tuple(v.shape)}')
    if q.shape[-1] % heads or v.shape[-1] % heads:
        raise ValueError(f'bra: heads={heads} must divide the channels of q '
                         f'({q.shape[-1]}) and v ({v.shape[-1]})')
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f'bra: q, k, v dtypes differ: {q.dtype}, {k.dtype},'
                         f' {v.dtype}')
    nw = graph.n_win
    if q.shape[1] % nw or q.shape[2] % nw:
        raise ValueError(
            f'bra: a {q.shape[1]}x{q.shape[2]} map is not n_win={nw} '
            'regions per side; pad it to multiples of n_win')
    if graph.topk_index.shape[0] != q.shape[0]:
        raise ValueError(
            f'bra: the region graph is for {graph.topk_index.shape[0]} '
            f'images, the maps hold {q.shape[0]}')
    if graph.key_valid is not None and \
            tuple(graph.key_valid.shape) != tuple(q.shape[1:3]):
        raise ValueError(f'bra: key_valid must be (H, W)={tuple(q.shape[1:3])}'
                         f', got {tuple(graph.key_valid.shape)}')


def bra(q: Tensor, k: Tensor, v: Tensor, graph: RegionGraph, heads: int,
        scale: Optional[float] = None, backend: str = 'auto') -> Tensor:
    """Token attention of bi-level routing attention.

    Args:
        q, k: ``(N, H, W, heads * d)`` queries and keys.
        v: ``(N, H, W, heads * dv)`` values.
        graph: the routing, :func:`~.routing.region_graph`.
        heads: attention heads.
        scale: logit scale; ``None`` means ``d ** -0.5`` (BiFormer passes
            ``qk_dim ** -0.5``, over all heads).
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        ``(N, H, W, heads * dv)``.
    """
    check_backend(backend)
    _check(q, k, v, graph, heads)
    scale = float((q.shape[-1] // heads)**-0.5 if scale is None else scale)
    if backend == 'reference':
        return _reference(q, k, v, graph, heads, scale)
    if backend == 'official':
        return _official(q, k, v, graph, heads, scale)
    if backend == 'flex':
        from . import flex_bra
        return flex_bra.forward(q, k, v, graph, heads, scale)
    out, _ = bra_forward(q, k, v, graph.topk_index, graph.key_valid,
                         graph.n_win, heads, scale, backend)
    return out
