"""Opt-in speed-ups outside the attention that keep the modules and the
state dict: registered products and :func:`swap_modules`.

The model is built from plain torch modules; these swaps change how some of
them compute, not what: every swapped module stays an instance of
its torch class (hooks, ``isinstance`` checks and wrappers see what they
expect) with the same parameters, and the products go through registered
operators whose CPU registration picks the kernel, so ``torch.compile`` and
``torch.export`` see one node each.

* ``nn.Linear`` -> :class:`AcceleratedLinear`: in inference
  ``mmbiformer::linear``, whose CPU registration runs float32 products in
  oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead of torch's
  default CPU GEMM at the AVX-512 level; other levels, devices and dtypes
  run ``F.linear``. The operator is differentiable, but the module trains
  through ``F.linear``: in an interleaved A/B of a BiFormer-S training
  step oneDNN's products saved 1.8 % at AVX-512 and nothing at AVX2,
  against 15.6 % of an inference step at AVX-512; at AVX2, on a processor
  without AVX-512, torch's products were the faster ones in inference too
  (``docs/benchmarks.md``).
* ``Sequential(Linear, [Identity,] GELU, Linear)`` -> :class:`AcceleratedMlp`:
  where no gradient is needed (inference), the MLP is one operator,
  ``mmbiformer::gelu_mlp_inference``: at AVX-512 both products in oneDNN
  with the GELU as a post-op of the first, saving one pass over the
  widest activation of the block (5.6 % of a BiFormer-S inference step);
  at AVX2 torch's products a block of rows at a time, the GELU in place on
  each block's hidden activations, which stay in the cache instead of
  taking fresh memory pages when they are large (:func:`mlp_in_blocks`;
  3-10 % of an inference step at batch 16, and 10 % against the oneDNN
  MLP, on an AVX2-only AMD EPYC). In training at the AVX-512
  level (:func:`training_fusions`) the MLP is one operator,
  ``mmbiformer::gelu_mlp``, that keeps the hidden pre-activation but not
  the GELU output and recomputes it in its backward in one pass of a C++
  kernel with the GELU gradient (3.4 % of a training step on an AMD EPYC,
  0.8 % on an Intel Xeon); elsewhere it computes as the plain
  ``Sequential`` does.
* a stride-1 "same" depthwise ``nn.Conv2d`` of a 5x5 or larger kernel (the
  LePE) -> :class:`AcceleratedDepthwiseConv`: in training
  ``mmbiformer::depthwise_conv2d``, whose weight gradient
  (``mmbiformer::depthwise_weight_grad``) runs the project's C++ kernel on
  the CPU in one pass over the maps, where torch's took about twice as long
  on 5x5 kernels (5.0 % of a BiFormer-S training step at AVX-512, 3.8 % at
  AVX2). torch's own 3x3 weight gradient was the faster one, so 3x3 convs
  stay plain.

* ``mmbiformer::add_layer_norm``: a residual add and the LayerNorm of its
  sum in one pass, forward and backward, for
  :class:`mmbiformer.models.accelerate.AcceleratedBlock` (7.4 % of a
  training step at AVX-512 on an AMD EPYC, 1.2 % on an Intel Xeon; used
  there only, like ``gelu_mlp``).

:func:`mmbiformer.models.accelerate.accelerate` applies these to the
BiFormer backbones of a model.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    'AcceleratedDepthwiseConv', 'AcceleratedLinear', 'AcceleratedMlp',
    'add_layer_norm', 'add_norm', 'depthwise_conv2d', 'depthwise_weight_grad',
    'gelu_mlp', 'gelu_mlp_inference', 'linear', 'mlp_in_blocks',
    'swap_modules', 'training_fusions'
]


def _onednn_linear():
    """oneDNN's product operator where its float32 products are used: at
    the AVX-512 capability level, where they saved 15.6 % of a BiFormer-S
    inference forward. On an AVX2-only AMD EPYC torch's products were the
    faster ones (4.6 % of a forward for the products outside the MLP), so
    below AVX-512 this is None and the products are torch's."""
    if not (torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled):
        return None
    from . import cpu_ext
    if cpu_ext.capability() != 'avx512':
        return None
    return getattr(getattr(torch.ops, 'mkldnn', None), '_linear_pointwise',
                   None)


@torch.library.custom_op('mmbiformer::linear', mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``; on the CPU in float32 through
    oneDNN at the AVX-512 level (:func:`_onednn_linear`)."""
    return F.linear(x, weight, bias).contiguous()


@linear.register_kernel('cpu')
def _(x, weight, bias):
    op = _onednn_linear()
    if op is None or x.dtype != torch.float32 or \
            weight.dtype != torch.float32:
        return F.linear(x, weight, bias).contiguous()
    return op(x, weight, bias, 'none', [], '').contiguous()


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    # (x, weight, bias) of linear and depthwise_conv2d alike
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    rows = grad.reshape(-1, grad.shape[-1])
    dx = rows.mm(weight).view(*grad.shape[:-1], weight.shape[1]) \
        if need_x else None
    dw = rows.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
    db = rows.sum(0) if need_b and ctx.has_bias else None
    return dx, dw, db


linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------- the MLP in inference

#: the inference MLP runs in row blocks where its hidden activations would
#: take more than this (bytes), each block's taking about _BLOCK_BYTES
_BLOCKS_ABOVE = 16 << 20
_BLOCK_BYTES = 4 << 20


def _cpu_float32(x: Tensor) -> bool:
    # float32 activations on the CPU outside autocast: where the CPU paths
    # of this module apply
    return x.device.type == 'cpu' and x.dtype == torch.float32 and \
        not _autocast(x)


def mlp_in_blocks(x: Tensor) -> bool:
    """Whether :func:`gelu_mlp_inference` computes the activations ``x``
    with torch's products a block of rows at a time (float32 on the CPU at
    the AVX2 capability level) rather than in oneDNN with the GELU as a
    post-op. On an AVX2-only AMD EPYC oneDNN's GELU post-op was slower
    than torch's product and an in-place GELU at every BiFormer-S stage,
    and a hidden activation of more than 32 MB (the MLP of the first stage
    at batch 16, or at detection sizes) took fresh memory pages on every
    call, since glibc maps such sizes anew when its heap holds no freed
    block that fits (``docs/benchmarks.md``)."""
    if not _cpu_float32(x):
        return False
    from . import cpu_ext
    return cpu_ext.capability() == 'avx2'


def _mlp_blocks(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor]) -> Tensor:
    # rows in blocks whose hidden activations stay in the cache, one hidden
    # buffer for all, each product written where it belongs
    rows = x.reshape(-1, x.shape[-1])
    n, hidden = rows.shape[0], w1.shape[0]
    hidden_bytes = n * hidden * rows.element_size()
    blocks = 1
    if hidden_bytes > _BLOCKS_ABOVE:
        blocks = -(-hidden_bytes // _BLOCK_BYTES)
    step = max(1, -(-n // blocks))
    out = rows.new_empty(n, w2.shape[0])
    h = rows.new_empty(min(step, n), hidden)
    for start in range(0, n, step):
        stop = min(start + step, n)
        hb = h[:stop - start]
        _product(rows[start:stop], w1, b1, hb)
        torch.ops.aten.gelu_(hb)
        _product(hb, w2, b2, out[start:stop])
    return out.view(*x.shape[:-1], w2.shape[0])


def _product(x: Tensor, weight: Tensor, bias: Optional[Tensor],
             out: Tensor) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


@torch.library.custom_op('mmbiformer::gelu_mlp_inference', mutates_args=())
def gelu_mlp_inference(x: Tensor, w1: Tensor, b1: Optional[Tensor],
                       w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)`` (exact, erf
    GELU). No gradient: for inference (:class:`AcceleratedMlp` calls it
    only where none is needed). On the CPU in float32: in row blocks of
    torch's products where :func:`mlp_in_blocks` says so, else both
    products in oneDNN with the GELU as the first one's post-op."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).contiguous()


@gelu_mlp_inference.register_kernel('cpu')
def _(x, w1, b1, w2, b2):
    params = [t for t in (w1, b1, w2, b2) if t is not None]
    if x.dtype == torch.float32 and all(t.dtype == torch.float32
                                        for t in params):
        if mlp_in_blocks(x):
            return _mlp_blocks(x, w1, b1, w2, b2)
        op = _onednn_linear()
        if op is not None:
            h = op(x, w1, b1, 'gelu', [], 'none')
            return op(h, w2, b2, 'none', [], '').contiguous()
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).contiguous()


@gelu_mlp_inference.register_fake
def _(x, w1, b1, w2, b2):
    return x.new_empty(*x.shape[:-1], w2.shape[0])


def training_fusions(x: Tensor) -> bool:
    """Whether the training fusions (:func:`gelu_mlp`,
    :func:`add_layer_norm`) run for the activations ``x``: float32 on the
    CPU at the AVX-512 capability level with the C++ kernels built. There
    they saved 3.4 % and 7.4 % of a BiFormer-S training step on an AMD
    EPYC, 0.8 % and 1.2 % on an Intel Xeon; at AVX2 they saved nothing
    measurable (0.0 % and 0.2 %, the Xeon at a forced AVX2; 1.7 % and
    -3.3 % on an AVX2-only AMD EPYC), so there the modules compute as the
    plain ones do (``docs/benchmarks.md``)."""
    if not _cpu_float32(x):
        return False
    from . import cpu_ext
    return cpu_ext.capability() == 'avx512' and cpu_ext.load() is not None


def _float32_kernels(*tensors: Tensor):
    """The C++ kernels where every tensor is float32 (and they load), else
    None."""
    if any(t.dtype != torch.float32 for t in tensors):
        return None
    from . import cpu_ext
    return cpu_ext.load()


# ------------------------------------------------ the MLP in training

@torch.library.custom_op('mmbiformer::gelu_mlp', mutates_args=())
def gelu_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
             b2: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)`` (exact GELU) and
    the hidden pre-activation ``F.linear(x, w1, b1)``, which its backward
    reads (the GELU output itself is not kept: the backward recomputes
    it)."""
    h = F.linear(x, w1, b1)
    return F.linear(F.gelu(h), w2, b2), h


@gelu_mlp.register_fake
def _(x, w1, b1, w2, b2):
    return (x.new_empty(*x.shape[:-1], w2.shape[0]),
            x.new_empty(*x.shape[:-1], w1.shape[0]))


def _gelu_and_grad(h: Tensor, da: Tensor) -> Tuple[Tensor, Tensor]:
    # gelu(h) and da * gelu'(h); on the CPU in float32 one pass of the C++
    # kernel, in place in da (a fresh product the caller owns)
    kernels = _float32_kernels(h, da) if h.device.type == 'cpu' else None
    if kernels is not None and h.is_contiguous() and da.is_contiguous():
        return kernels.gelu_grad(h, da), da
    return F.gelu(h), torch.ops.aten.gelu_backward(da, h)


@torch.library.custom_op('mmbiformer::gelu_mlp_backward', mutates_args=())
def gelu_mlp_backward(grad: Tensor, x: Tensor, h: Tensor, w1: Tensor,
                      w2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                           Tensor]:
    """Gradients ``(dx, dw1, db1, dw2, db2)`` of :func:`gelu_mlp` from the
    output gradient, its input ``x`` and hidden pre-activation ``h``."""
    rows = grad.reshape(-1, grad.shape[-1])
    hidden = h.reshape(-1, h.shape[-1])
    g, dh = _gelu_and_grad(hidden, rows.mm(w2))
    dw2 = rows.t().mm(g)
    del g
    dx = dh.mm(w1).view(*x.shape)
    dw1 = dh.t().mm(x.reshape(-1, x.shape[-1]))
    return dx, dw1, dh.sum(0), dw2, rows.sum(0)


@gelu_mlp_backward.register_fake
def _(grad, x, h, w1, w2):
    return (torch.empty_like(x), torch.empty_like(w1),
            w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _mlp_setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, output[1], w1, w2)
    ctx.has_bias = (b1 is not None, b2 is not None)


def _mlp_backward(ctx, grad: Tensor, grad_h: Optional[Tensor]):
    x, h, w1, w2 = ctx.saved_tensors
    # the second output (the pre-activation) is for the backward only;
    # mlp_forward never hands it out, so its gradient is zero
    dx, dw1, db1, dw2, db2 = gelu_mlp_backward(grad.contiguous(), x, h, w1,
                                               w2)
    return (dx, dw1, db1 if ctx.has_bias[0] else None, dw2,
            db2 if ctx.has_bias[1] else None)


gelu_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


# ----------------------------------- a residual add and the norm of its sum

def _per_sample(scale: Tensor, dim: int) -> Tensor:
    # per-sample factors (N,) as (N, 1, ..., 1) for maps of ``dim`` dims
    return scale.view((-1, ) + (1, ) * (dim - 1))


def _rows_of(t: Tensor) -> int:
    return t.numel() // t.shape[-1] if t.shape[-1] else 0


def _add_norm_c_kernels(x: Tensor, y: Tensor, *params: Tensor):
    # the C++ kernels where they apply: contiguous float32 CPU maps of
    # channels a multiple of 16
    if x.device.type != 'cpu' or x.shape[-1] % 16 or \
            not (x.is_contiguous() and y.is_contiguous()):
        return None
    return _float32_kernels(x, y, *params)


@torch.library.custom_op('mmbiformer::add_layer_norm', mutates_args=())
def add_layer_norm(x: Tensor, y: Tensor, scale: Optional[Tensor],
                   weight: Tensor, bias: Tensor,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``z = x + scale * y`` (``scale``: per-sample factors ``(N,)`` or
    None for 1) and ``F.layer_norm(z, (C,), weight, bias, eps)`` of
    channels-last maps ``(N, ..., C)``, with the norm's per-row mean and
    reciprocal standard deviation ``(rows,)``; on the CPU in float32 one
    pass of the C++ kernel."""
    kernels = _add_norm_c_kernels(x, y, weight, bias)
    if kernels is not None:
        return tuple(kernels.add_layer_norm(x, y, scale, weight.contiguous(),
                                            bias.contiguous(), eps))
    if scale is None:
        z = x + y
    else:
        z = torch.addcmul(x, y, _per_sample(scale, x.dim()))
    out, mean, rstd = torch.native_layer_norm(z, (z.shape[-1], ), weight,
                                              bias, eps)
    return z.contiguous(), out, mean.reshape(-1), rstd.reshape(-1)


@add_layer_norm.register_fake
def _(x, y, scale, weight, bias, eps):
    rows = _rows_of(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(rows), x.new_empty(rows))


@torch.library.custom_op('mmbiformer::add_layer_norm_backward',
                         mutates_args=())
def add_layer_norm_backward(
        grad_z: Tensor, grad_out: Tensor, z: Tensor, mean: Tensor,
        rstd: Tensor, weight: Tensor, bias: Tensor,
        scale: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dy, dweight, dbias)`` of :func:`add_layer_norm`
    from those of ``z`` and of the normalised map; without ``scale`` ``dy``
    equals ``dx`` and comes back empty."""
    kernels = _add_norm_c_kernels(grad_z, grad_out, z)
    if kernels is not None:
        dz, dy, dw, db = kernels.add_layer_norm_backward(
            grad_z, grad_out, z, mean, rstd, weight.contiguous(), scale,
            scale is not None)
        return dz, dy, dw, db
    shape = z.shape[:-1] + (1, )
    dz, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad_out, z, (z.shape[-1], ), mean.view(shape), rstd.view(shape),
        weight, bias, [True, True, True])
    dz = dz + grad_z
    dy = dz.new_empty(0) if scale is None else \
        dz * _per_sample(scale, z.dim())
    return dz, dy, dw, db


@add_layer_norm_backward.register_fake
def _(grad_z, grad_out, z, mean, rstd, weight, bias, scale):
    return (torch.empty_like(z),
            z.new_empty(0) if scale is None else torch.empty_like(z),
            torch.empty_like(weight), torch.empty_like(weight))


def _add_norm_setup_context(ctx, inputs, output) -> None:
    x, y, scale, weight, bias, eps = inputs
    z, _, mean, rstd = output
    ctx.save_for_backward(z, mean, rstd, weight, bias, scale)


def _add_norm_backward(ctx, grad_z, grad_out, grad_mean, grad_rstd):
    z, mean, rstd, weight, bias, scale = ctx.saved_tensors
    dx, dy, dw, db = add_layer_norm_backward(grad_z.contiguous(),
                                             grad_out.contiguous(), z, mean,
                                             rstd, weight, bias, scale)
    return dx, dx if scale is None else dy, None, dw, db, None


add_layer_norm.register_autograd(_add_norm_backward,
                                 setup_context=_add_norm_setup_context)


def add_norm(x: Tensor, y: Tensor, norm: nn.LayerNorm,
             scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(z, norm(z))`` with ``z = x + y``, or ``x + scale * y`` for
    per-sample factors ``scale`` ``(N,)``, over the last dim, through
    ``mmbiformer::add_layer_norm`` (``norm``: an affine ``nn.LayerNorm``
    over that dim)."""
    z, out, _, _ = add_layer_norm(x.contiguous(), y.contiguous(), scale,
                                  norm.weight, norm.bias, norm.eps)
    return z, out


def _grad_needed(x: Tensor, *params: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in params))


class AcceleratedLinear(nn.Linear):
    """``nn.Linear`` computing through ``mmbiformer::linear`` where no
    gradient is needed (inference); in training it computes as
    ``nn.Linear`` does (oneDNN's products did not pay a measured share of a
    training step). Same parameters and results to float rounding."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_forward(self, x)


def _autocast(x: Tensor) -> bool:
    # mixed precision decides the products' dtypes; the registered
    # operators take their inputs as they come, so under autocast the
    # accelerated modules compute as the plain ones
    return torch.is_autocast_enabled(x.device.type)


def linear_forward(layer: nn.Linear, x: Tensor) -> Tensor:
    """The layer's output: ``F.linear`` where a gradient is needed or
    autocast is on, else ``mmbiformer::linear``."""
    if _grad_needed(x, layer.weight, layer.bias) or _autocast(x):
        return F.linear(x, layer.weight, layer.bias)
    return linear(x, layer.weight, layer.bias)


def _nhwc(t: Tensor) -> Tensor:
    # an (N, C, H, W) map as an (N, H, W, C) view with unit channel stride
    if t.stride(1) != 1:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 2, 3, 1)


@torch.library.custom_op('mmbiformer::depthwise_weight_grad',
                         mutates_args=())
def depthwise_weight_grad(x: Tensor, grad: Tensor, kernel_size: int) -> Tensor:
    """Weight gradient ``(C, 1, k, k)`` of a stride-1 "same" depthwise conv
    of ``x`` (N, C, H, W) with output gradient ``grad``; on the CPU in
    float32 the project's C++ kernel (one pass over the maps), else
    torch's ``convolution_backward``."""
    return _torch_weight_grad(x, grad, kernel_size)


def _torch_weight_grad(x: Tensor, grad: Tensor, k: int) -> Tensor:
    c = x.shape[1]
    weight = x.new_empty(c, 1, k, k)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [k // 2, k // 2], [1, 1], False,
        [0, 0], c, [False, True, False])[1]


@depthwise_weight_grad.register_kernel('cpu')
def _(x, grad, kernel_size):
    kernels = _float32_kernels(x, grad)
    if kernels is None:
        return _torch_weight_grad(x, grad, kernel_size)
    return kernels.dwconv_weight_grad(_nhwc(x), _nhwc(grad), kernel_size)


@depthwise_weight_grad.register_fake
def _(x, grad, kernel_size):
    return x.new_empty(x.shape[1], 1, kernel_size, kernel_size)


@torch.library.custom_op('mmbiformer::depthwise_conv2d', mutates_args=())
def depthwise_conv2d(x: Tensor, weight: Tensor,
                     bias: Optional[Tensor]) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``: a stride-1
    "same" depthwise conv of ``x`` (N, C, H, W) with a ``(C, 1, k, k)``
    kernel, ``k`` odd. Its backward takes the weight gradient from
    :func:`depthwise_weight_grad` and the input gradient as the same conv
    of the output gradient with the kernel flipped."""
    k = weight.shape[-1]
    return F.conv2d(x, weight, bias, 1, k // 2, 1, weight.shape[0])


@depthwise_conv2d.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


def _dw_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    k, c = weight.shape[-1], weight.shape[0]
    # the input gradient is the same conv of the output gradient with the
    # kernel flipped: torch's fast forward path
    dx = F.conv2d(grad, weight.flip([2, 3]), None, 1, k // 2, 1, c) \
        if need_x else None
    dw = depthwise_weight_grad(x, grad, k) if need_w else None
    db = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    return dx, dw, db


depthwise_conv2d.register_autograd(_dw_backward,
                                   setup_context=_setup_context)


def _is_depthwise(conv: nn.Module, min_kernel: int = 5) -> bool:
    # a stride-1 "same" depthwise conv of an odd kernel >= min_kernel: on
    # 3x3 kernels torch's own weight gradient was the faster one
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels ==
            conv.out_channels and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.kernel_size[0] % 2 == 1
            and conv.kernel_size[0] >= min_kernel and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros'
            and conv.padding == (conv.kernel_size[0] // 2, ) * 2)


def depthwise_forward(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The conv's output; through ``mmbiformer::depthwise_conv2d`` where a
    gradient is needed (and autocast is off)."""
    if _grad_needed(x, conv.weight, conv.bias) and not _autocast(x):
        return depthwise_conv2d(x, conv.weight, conv.bias)
    return conv._conv_forward(x, conv.weight, conv.bias)


class AcceleratedDepthwiseConv(nn.Conv2d):
    """A stride-1 "same" depthwise ``nn.Conv2d`` (5x5 or larger: BiFormer's
    LePE) whose training goes through ``mmbiformer::depthwise_conv2d``
    (the one-pass C++ weight gradient on the CPU); in inference it computes
    as ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_forward(self, x)


def _mlp_layers(seq: nn.Module):
    """``(fc1, fc2)`` of a ``Sequential(Linear, [Identity,] GELU, Linear)``
    with the exact GELU, else None."""
    if not isinstance(seq, nn.Sequential):
        return None
    layers = [m for m in seq if type(m) is not nn.Identity]
    if len(layers) != 3:
        return None
    fc1, act, fc2 = layers
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and type(act) is nn.GELU and act.approximate == 'none'):
        return None
    return fc1, fc2


def mlp_forward(mlp: 'AcceleratedMlp', x: Tensor) -> Tensor:
    """The MLP's output: with gradients one ``mmbiformer::gelu_mlp`` (the
    GELU recomputed in the backward) where :func:`training_fusions` says
    so, else the plain ``Sequential``; without gradients one
    ``mmbiformer::gelu_mlp_inference``. Under autocast the plain
    ``Sequential``."""
    fc1, fc2 = _mlp_layers(mlp)
    if _autocast(x):
        return nn.Sequential.forward(mlp, x)
    if _grad_needed(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        if training_fusions(x):
            return gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)[0]
        return nn.Sequential.forward(mlp, x)
    return gelu_mlp_inference(x, fc1.weight, fc1.bias, fc2.weight,
                              fc2.bias)


class AcceleratedMlp(nn.Sequential):
    """A ``Sequential(Linear, [Identity,] GELU, Linear)`` MLP that runs as
    one operator in inference, ``mmbiformer::gelu_mlp_inference`` (same
    modules, parameters and results to float rounding; forward hooks on the
    inner layers fire only in training)."""

    def forward(self, x: Tensor) -> Tensor:
        return mlp_forward(self, x)


def swap_modules(model: nn.Module) -> int:
    """Swap, in place, every plain ``nn.Linear`` of ``model`` for
    :class:`AcceleratedLinear`, every plain GELU MLP ``Sequential`` for
    :class:`AcceleratedMlp` and every stride-1 "same" depthwise conv of a
    5x5 or larger kernel for :class:`AcceleratedDepthwiseConv`
    (parameters, buffers and the state dict unchanged). Returns how many
    modules were swapped."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Sequential and _mlp_layers(module):
            module.__class__ = AcceleratedMlp
            count += 1
        elif type(module) is nn.Linear:
            module.__class__ = AcceleratedLinear
            count += 1
        elif _is_depthwise(module):
            module.__class__ = AcceleratedDepthwiseConv
            count += 1
    return count
