"""Building blocks of the BiFormer backbone (torch only).

Tensor layouts: ``NCHW`` is (batch, channels, height, width), ``NHWC`` is
(batch, height, width, channels). The blocks follow the official BiFormer
implementation (Zhu et al., CVPR 2023) so that official checkpoints load
with unchanged parameter names.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``NCHW`` map.

    This is the per-output norm of the official dense-prediction (detection
    and segmentation) BiFormer backbones (``extra_norms``), eps 1e-6.

    Args:
        num_channels (int): Number of channels ``C``.
        eps (float): Added to the variance. Defaults to 1e-6.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample, scaling the
    kept ones by ``1 / (1 - drop_prob)``.

    Args:
        drop_prob (float): Probability of dropping a sample's branch.
    """

    def __init__(self, drop_prob: float = 0.) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def sample_factors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample factors ``(N, 1, ..., 1)`` for ``x``: 0 (dropped)
        or ``1 / (1 - drop_prob)`` (kept)."""
        keep = 1. - self.drop_prob
        shape = (x.shape[0], ) + (1, ) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        return x * self.sample_factors(x)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


def depthwise_conv(dim: int, kernel_size: int) -> nn.Conv2d:
    """A depthwise ``k x k`` conv (stride 1, "same" padding) on ``(N, C, H,
    W)`` maps: BiFormer's position embedding and LePE."""
    return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2,
                     groups=dim)


class GlobalAttention(nn.Module):
    """Plain global multi-head self-attention of BiFormer's last stage.

    Used where the official code has ``topk == -2`` (attention with a
    locally-enhanced positional encoding, LePE) or ``topk == -1`` (no LePE).
    The official model uses 8 heads whatever the width, no qkv bias and the
    scale ``(dim / num_heads) ** -0.5``.

    The LePE (a depthwise conv) is applied to the attention's *input* ``x``
    (the normalised block input), not to the values ``v``: this is what the
    official model computes (the reference fixtures decide it; applying it
    to ``v`` instead changes the last stage output by ~1). The official
    BiFormer-STL-nchw applies it to ``v`` (``lepe_input='v'``).

    The attention runs as ``F.scaled_dot_product_attention`` (the same
    result as softmax(q k^T * scale) v to ~1e-6; on the CPU it was ~3x
    faster at dense-prediction sizes, e.g. 1050 tokens, and about equal at
    49 tokens; on GPUs it avoids storing the attention matrix). FLOP
    counters need a handle for it:
    :func:`mmbiformer.models.complexity.sdpa_flop_jit`.

    Args:
        dim (int): Channels ``C``.
        num_heads (int): Number of heads. Defaults to 8.
        qkv_bias (bool): Bias in the qkv projection. Defaults to False.
        qk_scale (float, optional): Overrides ``(C / num_heads) ** -0.5``.
        side_dwconv (int): LePE kernel size; 0 disables the LePE.
            Defaults to 5.
        lepe_input (str): What the LePE convolves: ``'x'`` (the input, as
            BiFormer and BiFormer-STL) or ``'v'`` (the values, as
            BiFormer-STL-nchw). Defaults to ``'x'``.

    Shape:
        ``x`` (N, H, W, C) -> (N, H, W, C).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int = 8,
                 qkv_bias: bool = False,
                 qk_scale: Optional[float] = None,
                 side_dwconv: int = 5,
                 lepe_input: str = 'x') -> None:
        super().__init__()
        if lepe_input not in ('x', 'v'):
            raise ValueError(
                f"lepe_input must be 'x' or 'v', got {lepe_input!r}")
        if dim % num_heads != 0:
            raise ValueError(
                f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.lepe_input = lepe_input
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if side_dwconv > 0:
            self.lepe = depthwise_conv(dim, side_dwconv)
        else:
            self.lepe = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H, W, C)."""
        n, h, w, c = x.shape
        m = self.num_heads
        qkv = self.qkv(x).reshape(n, h * w, 3, m, c // m)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, m, L, d)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(n, h, w, c)
        if self.lepe is not None:
            # (N, C, H, W) view of x, or of v (heads back along channels)
            src = x.permute(0, 3, 1, 2) if self.lepe_input == 'x' else \
                v.transpose(2, 3).reshape(n, c, h, w)
            out = out + self.lepe(src).permute(0, 2, 3, 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, '
                f'lepe_input={self.lepe_input!r}')


class BiFormerBlock(nn.Module):
    """One BiFormer block (pre-norm, no layer scale)::

        x = x + pos_embed(x)                      # depthwise conv
        x = x + drop_path(attn(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))

    Parameter names follow the official model: ``pos_embed``, ``norm1``,
    ``attn``, ``norm2``, ``mlp.0`` and ``mlp.3`` (``mlp.1`` is an identity,
    ``mlp.2`` the GELU).

    Args:
        dim (int): Channels ``C``.
        attn (nn.Module): Token mixer mapping (N, H, W, C) to (N, H, W, C).
        mlp_ratio (float): Hidden width of the MLP relative to ``C``.
        drop_path (float): Stochastic-depth probability.
        pos_embed_kernel (int): Kernel of the depthwise conv position
            embedding (official ``before_attn_dwconv``); 0 disables it.

    Shape:
        ``x`` (N, C, H, W) -> (N, C, H, W); the attention and the MLP see
        the channels-last view ``(N, H, W, C)``.
    """

    def __init__(self,
                 dim: int,
                 attn: nn.Module,
                 mlp_ratio: float = 3.,
                 drop_path: float = 0.,
                 pos_embed_kernel: int = 3) -> None:
        super().__init__()
        self.pos_embed = (depthwise_conv(dim, pos_embed_kernel)
                          if pos_embed_kernel > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.Identity(), nn.GELU(),
            nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else \
            nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)
