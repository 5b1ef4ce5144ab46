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

from ..ops import cpu_ext
from ..ops.dwconv import DepthwiseConv2d
from ..ops.linear import Linear, gelu_mlp
from ..ops.norm import add_norm


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
    """Stochastic depth: drops the whole residual branch per sample.

    Args:
        drop_prob (float): Probability of dropping a sample's branch.
    """

    def __init__(self, drop_prob: float = 0.) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def sample_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample factors ``(N, 1, ..., 1)``: 0 (dropped) or
        ``1 / (1 - drop_prob)`` (kept)."""
        keep = 1. - self.drop_prob
        shape = (x.shape[0], ) + (1, ) * (x.ndim - 1)
        return x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        return x * self.sample_scale(x)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


def kept_samples(scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The samples whose branch drop path keeps (``scale`` > 0), where
    running the branch for them alone pays: on the CPU (elsewhere the index
    would wait for the device) and when some but not all are dropped.
    ``None``: run the branch for the whole batch."""
    if scale is None or scale.device.type != 'cpu' or \
            cpu_ext.capturing_graph():
        return None
    kept = scale.view(-1).nonzero().view(-1)
    return None if kept.numel() == scale.shape[0] else kept


class GlobalAttention(nn.Module):
    """Plain global multi-head self-attention of BiFormer's last stage.

    Used where the official code has ``topk == -2`` (attention with a
    locally-enhanced positional encoding, LePE) or ``topk == -1`` (no LePE).
    The official model uses 8 heads whatever the width, no qkv bias and the
    scale ``(dim / num_heads) ** -0.5``.

    The LePE (a depthwise conv) is applied to the attention's *input* ``x``
    (the normalised block input), not to the values ``v``: this is what the
    official model computes (the reference fixtures decide it; applying it
    to ``v`` instead changes the last stage output by ~1).

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

    Shape:
        ``x`` (N, H, W, C) -> (N, H, W, C).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int = 8,
                 qkv_bias: bool = False,
                 qk_scale: Optional[float] = None,
                 side_dwconv: int = 5) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        if side_dwconv > 0:
            self.lepe = DepthwiseConv2d(dim, side_dwconv)
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
            lepe = self.lepe(x.permute(0, 3, 1, 2))
            out = out + lepe.permute(0, 2, 3, 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


class BiFormerBlock(nn.Module):
    """One BiFormer block (pre-norm, no layer scale)::

        x = x + pos_embed(x)                      # depthwise conv, NCHW
        x = x + drop_path(attn(norm1(x)))         # NHWC
        x = x + drop_path(mlp(norm2(x)))          # NHWC

    In CPU training with drop path, a branch whose samples are partly
    dropped runs for the kept samples only and is added to theirs
    (``index_add``): the dropped ones would add zeros, so the result is the
    same to float rounding, for less work (in expectation the drop rate of
    the branch's FLOPs; BiFormer-S's rates rise to 0.15).

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
        ``x`` (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self,
                 dim: int,
                 attn: nn.Module,
                 mlp_ratio: float = 3.,
                 drop_path: float = 0.,
                 pos_embed_kernel: int = 3) -> None:
        super().__init__()
        if pos_embed_kernel > 0:
            self.pos_embed = DepthwiseConv2d(dim, pos_embed_kernel)
        else:
            self.pos_embed = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(
            Linear(dim, hidden), nn.Identity(), nn.GELU(),
            Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else \
            nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.pos_embed is not None:
            x = self.pos_embed.forward_residual(x)  # x + pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        # attention branch, then norm2 of the sum (with the add, one op in
        # CPU training where the branch runs for the whole batch)
        scale = self._drop_scale(x)
        kept = kept_samples(scale)
        if kept is None:
            x, h = add_norm(x, self.attn(self.norm1(x)), self.norm2, scale)
        else:
            x = self._add_kept(x, kept, lambda t: self.attn(self.norm1(t)),
                               x)
            h = self.norm2(x)
        # MLP branch
        scale = self._drop_scale(x)
        kept = kept_samples(scale)
        if kept is None:
            y = self._mlp(h)
            x = x + y if scale is None else torch.addcmul(x, y, scale)
        else:
            x = self._add_kept(x, kept, self._mlp, h)
        return x.permute(0, 3, 1, 2)

    def _drop_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # a branch's drop-path factors, None without drop path
        dp = self.drop_path
        if isinstance(dp, DropPath) and dp.training and dp.drop_prob > 0:
            return dp.sample_scale(x)
        return None

    def _add_kept(self, x: torch.Tensor, kept: torch.Tensor, branch,
                  inp: torch.Tensor) -> torch.Tensor:
        """``x + drop_path(branch(inp))`` with the branch run only for the
        ``kept`` samples (the dropped ones would add zeros). With every
        sample dropped it runs on an empty batch: its parameters still get
        (zero) gradients, as distributed data parallel training expects of
        every parameter in every step."""
        return torch.index_add(x, 0, kept, branch(inp[kept]),
                               alpha=1. / (1. - self.drop_path.drop_prob))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        # self.mlp(x); on the CPU one op in training, the GELU fused into
        # the first product in inference
        return gelu_mlp(x, self.mlp[0], self.mlp[3])
