"""Replacement objects for ``ab_train_step.py`` (``--replacement
benchmarks.variants:NAME``): each is the plain computation that an
accelerated one is measured against."""
import torch.nn as nn


def plain_mlp(mlp: nn.Sequential, x):
    """The MLP as ``nn.Sequential`` computes it (three ops on whole
    tensors, no fused GELU, no row blocks)."""
    return nn.Sequential.forward(mlp, x)


def plain_conv(conv: nn.Conv2d, x):
    """The conv as ``nn.Conv2d`` computes it (torch's backward)."""
    return conv._conv_forward(x, conv.weight, conv.bias)


def op_linear(layer: nn.Linear, x):
    """The layer through ``mmbiformer::linear`` in training too (oneDNN
    forward with the bias fused, torch's products in the backward)."""
    from mmbiformer.ops.accelerate import linear
    return linear(x, layer.weight, layer.bias)


def plain_block(block: nn.Module, x):
    """The block as ``BiFormerBlock`` computes it (the residual add and
    ``norm2`` as separate ops)."""
    from mmbiformer.models.layers import BiFormerBlock
    return BiFormerBlock.forward(block, x)


#: the CPU levels where the operator's ``auto`` took the C++ kernels before
#: they had an 8-lane build (``mmbiformer.ops.bra:_KERNEL_LEVELS``): at
#: AVX2 the portable implementation ran
KERNEL_LEVELS_AVX512_ONLY = ('avx512', )


def onednn_products():
    """oneDNN's product operator whatever the capability level (the
    products of ``mmbiformer::linear`` in oneDNN at AVX2 too)."""
    import torch
    return torch.ops.mkldnn._linear_pointwise
