"""``BiLevelRoutingAttention``: the BRA layer of BiFormer as an nn.Module."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .cpu_bra import (
    cpu_backend_applies,
    token_cpu_attention,
    token_cpu_attention_lepe,
)
from .dwconv import DepthwiseConv2d
from .functional import BACKENDS, bra_attention, select_backend
from .fused_cpu import token_dense_attention, use_token_dense
from .linear import Linear
from .routing import region_mean, route

__all__ = ['BiLevelRoutingAttention', 'QKVLinear']

PAD_MODES = ('legacy', 'masked')


class QKVLinear(nn.Module):
    """One linear layer producing ``q | k | v`` along channels.

    Kept as a submodule so the parameter is named ``qkv.qkv`` like in the
    official checkpoints.
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(..., dim)`` -> q ``(..., qk_dim)``, k ``(..., qk_dim)``, v
        ``(..., dim)``."""
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim],
                                 dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BiFormer, CVPR 2023).

    The feature map is split into ``n_win x n_win`` regions; every region
    routes to the ``topk`` regions whose mean key best matches its mean query
    (one routing shared by all heads), then its tokens attend to the tokens
    of those regions. A depthwise conv on ``v`` (LePE) is added before the
    output projection ``wo``.

    Args:
        dim: channels ``C`` of the input and output.
        num_heads: attention heads; must divide ``qk_dim`` and ``dim``.
        n_win: regions per side.
        qk_dim: query/key channels (default ``dim``).
        qk_scale: logit scale (default ``qk_dim ** -0.5``: over all heads,
            like the official code).
        topk: routed regions per query region, ``1 <= topk <= n_win**2``.
        side_dwconv: LePE kernel size (odd; ``0`` disables LePE).
        auto_pad: zero-pad bottom/right to a multiple of ``n_win`` (else the
            map must be divisible by ``n_win``); the output is cropped back.
        pad_mode: ``'legacy'`` (padded tokens go through ``qkv`` and take
            part in routing and attention, as in the official code) or
            ``'masked'`` (padded tokens are excluded from the region means
            and as keys).
        backend: attention backend, one of ``'reference'``, ``'official'``,
            ``'gather'``, ``'fused'``, ``'triton'``, ``'auto'``; a plain
            attribute that can be changed at any time.

    Shapes:
        ``forward(x)``: ``x`` ``(N, H, W, C)`` channels-last, returns
        ``(N, H, W, C)``. With ``return_routing=True`` also a dict with
        ``topk_index`` ``(N, R, topk)`` int64, ``routing_logits``
        ``(N, R, R)`` (detached), ``n_win``, ``padded_hw`` ``(Hp, Wp)``,
        ``region_hw`` ``(Hp // n_win, Wp // n_win)`` and ``backend`` (the
        one actually used), with ``R = n_win ** 2``.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7,
                 qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, topk: int = 4,
                 side_dwconv: int = 5, auto_pad: bool = False,
                 pad_mode: str = 'legacy', backend: str = 'auto') -> None:
        super().__init__()
        qk_dim = qk_dim or dim
        for name, val in (('dim', dim), ('num_heads', num_heads),
                          ('n_win', n_win), ('qk_dim', qk_dim),
                          ('topk', topk)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f'{name} must be a positive int, got {val!r}')
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(
                f'num_heads={num_heads} must divide dim={dim} and '
                f'qk_dim={qk_dim}; choose num_heads among the common '
                'divisors (e.g. dim // 32)')
        if topk > n_win * n_win:
            raise ValueError(
                f'topk={topk} is larger than the number of regions '
                f'n_win**2={n_win * n_win}; use topk <= {n_win * n_win} or '
                'a larger n_win')
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise ValueError(f'side_dwconv={side_dwconv} must be 0 (no LePE) '
                             'or an odd kernel size such as 3 or 5')
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode={pad_mode!r} is not supported; choose '
                             f'one of {PAD_MODES}')
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim ** -0.5
        self.topk = topk
        self.side_dwconv = side_dwconv
        self.auto_pad = auto_pad
        self.pad_mode = pad_mode
        self.backend = backend

        self.qkv = QKVLinear(dim, qk_dim)
        self.wo = Linear(dim, dim)
        if side_dwconv > 0:
            self.lepe = DepthwiseConv2d(dim, side_dwconv)
        else:
            self.lepe = None

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, '
                f'n_win={self.n_win}, qk_dim={self.qk_dim}, '
                f'topk={self.topk}, auto_pad={self.auto_pad}, '
                f'pad_mode={self.pad_mode!r}, backend={self.backend!r}')

    def forward(self, x: Tensor, return_routing: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Dict[str, Any]]]:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                'BiLevelRoutingAttention expects channels-last input (N, H, '
                f'W, C={self.dim}), got shape {tuple(x.shape)}')
        if self.backend not in BACKENDS:
            raise ValueError(f'backend={self.backend!r} is not supported; '
                             f'choose one of {BACKENDS}')
        n, h_in, w_in, _ = x.shape
        nw = self.n_win
        # pads from ceil(size / n_win): under torch.export the padded size
        # is then provably a multiple of n_win
        pad_b = (h_in + nw - 1) // nw * nw - h_in
        pad_r = (w_in + nw - 1) // nw * nw - w_in
        # exporting with auto_pad: pad and crop unconditionally (possibly by
        # zero) so that one exported graph serves every input size
        always_pad = self.auto_pad and torch.compiler.is_exporting()
        if always_pad or pad_b or pad_r:
            if not self.auto_pad and (h_in < nw or w_in < nw):
                raise ValueError(
                    f'feature map {h_in}x{w_in} is smaller than the '
                    f'{nw}x{nw} region grid (n_win={nw}); set auto_pad=True '
                    f'or use n_win <= {min(h_in, w_in)}')
            if not self.auto_pad:
                raise ValueError(
                    f'feature map {h_in}x{w_in} is not divisible by '
                    f'n_win={nw}; set auto_pad=True or resize the input to '
                    f'a multiple of {nw}')
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h_in + pad_b, w_in + pad_r
        rh, rw = hp // nw, wp // nw

        qkv = self.qkv.qkv(x)  # (N, Hp, Wp, 2 * qk_dim + dim)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        m = self.num_heads
        masked = self.pad_mode == 'masked' and (always_pad or pad_b or pad_r)
        backend = self.backend
        if backend == 'auto':
            # decided on the per-head layout (the head dim matters)
            backend = select_backend(q.unflatten(-1, (m, self.qk_dim // m)))
        token_order = None
        if backend == 'cpu':
            if not masked and cpu_backend_applies(q, v, self.qk_dim // m,
                                                  self.dim // m):
                token_order = token_cpu_attention
            else:
                backend = 'fused'
        if backend == 'fused' and not masked and use_token_dense(
                q, v, nw * nw, rh * rw, self.topk, m):
            # small map: dense masked attention in the map's token order
            # (see mmbiformer.ops.fused_cpu), no region-major copies
            token_order = token_dense_attention
        token_triton = False
        if backend == 'triton' and not masked:
            from .triton_bra import token_triton_applies
            token_triton = token_triton_applies(qkv, self.qk_dim // m,
                                                self.dim // m)
        with_lepe = self.lepe is not None
        if token_order is not None or token_triton:
            logits, topk_index = self._route_token_order(qkv, n, rh, rw)
            if token_triton:
                out = self._token_triton(qkv, topk_index)
            elif token_order is token_cpu_attention and with_lepe and \
                    not torch.is_autocast_enabled('cpu'):
                # attention and LePE in one op, one qkv-shaped gradient
                out = token_cpu_attention_lepe(qkv, topk_index, nw, m,
                                               self.qk_dim, self.scale,
                                               self.lepe)
                with_lepe = False
            else:
                out = token_order(q, k, v, topk_index, nw, m, self.scale)
        else:
            out, logits, topk_index = self._region_major(
                q, k, v, backend, masked, n, h_in, w_in, hp, wp)
        if with_lepe:
            lepe = self.lepe(v.permute(0, 3, 1, 2))
            out = out + lepe.permute(0, 2, 3, 1)
        out = self.wo(out)
        if always_pad:
            # index_select, not a slice: export would guard on whether the
            # sliced view is contiguous, i.e. specialise on the input size
            out = out.index_select(1, torch.arange(h_in, device=out.device))
            out = out.index_select(2, torch.arange(w_in, device=out.device))
        elif pad_b or pad_r:
            out = out[:, :h_in, :w_in, :].contiguous()
        if not return_routing:
            return out
        info = dict(topk_index=topk_index, routing_logits=logits,
                    n_win=nw, padded_hw=(hp, wp), region_hw=(rh, rw),
                    backend=backend)
        return out, info

    def _token_triton(self, qkv: Tensor, topk_index: Tensor) -> Tensor:
        """The Triton kernels on the ``qkv`` output in token order."""
        from .triton_bra import token_triton_attention
        return token_triton_attention(qkv, topk_index, self.n_win,
                                      self.num_heads, self.qk_dim,
                                      self.scale)

    def _route_token_order(self, qkv: Tensor, n: int, rh: int,
                           rw: int) -> Tuple[Tensor, Tensor]:
        """Routing from the channels-last ``qkv`` output: region means of
        q and k in one average-pooling pass, then :func:`route`.

        The pass pools all of ``qkv`` (v's means are not used): pooling the
        q | k slice alone would first copy that strided slice into a
        contiguous map, which costs more than reading v's channels."""
        nw = self.n_win
        with torch.no_grad():
            pooled = F.avg_pool2d(qkv.permute(0, 3, 1, 2), (rh, rw))
            qk_win = pooled.permute(0, 2, 3, 1)[..., :2 * self.qk_dim]
            qk_win = qk_win.reshape(n, nw * nw, 2 * self.qk_dim)
            q_win, k_win = qk_win.split(self.qk_dim, dim=-1)
            return route(q_win, k_win, self.topk, self.scale)

    def _region_major(self, q: Tensor, k: Tensor, v: Tensor, backend: str,
                      masked: bool, n: int, h_in: int, w_in: int, hp: int,
                      wp: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Routing and attention on region-major copies of q, k, v (every
        backend; masked padding). Returns the ``(N, Hp, Wp, dim)`` output,
        the routing logits and the top-k index."""
        nw, m = self.n_win, self.num_heads
        rh, rw = hp // nw, wp // nw

        def heads_by_region(t: Tensor) -> Tensor:
            # one copy: (N, Hp, Wp, m*c) -> (N, m, R, T, c)
            return rearrange(t, 'n (j h) (i w) (m c) -> n m (j i) (h w) c',
                             j=nw, i=nw, m=m).contiguous()

        qh, kh, vh = heads_by_region(q), heads_by_region(k), heads_by_region(v)

        token_mask = None
        region_valid = None
        if masked:
            valid = ((torch.arange(hp, device=q.device) < h_in)[:, None]
                     & (torch.arange(wp, device=q.device) < w_in)[None, :])
            token_mask = rearrange(valid, '(j h) (i w) -> (j i) (h w)', j=nw,
                                   i=nw).unsqueeze(0)  # (1, R, T)
            region_valid = token_mask.any(-1)  # (1, R)

        with torch.no_grad():
            # region means over tokens, all heads' channels: (N, R, qk_dim)
            q_win = rearrange(region_mean(qh.flatten(0, 1), token_mask),
                              '(n m) r c -> n r (m c)', m=m)
            k_win = rearrange(region_mean(kh.flatten(0, 1), token_mask),
                              '(n m) r c -> n r (m c)', m=m)
            logits, topk_index = route(q_win, k_win, self.topk, self.scale,
                                       region_valid)

        key_mask = None
        if token_mask is not None:
            key_mask = token_mask.expand(n, -1, -1)
        out = bra_attention(qh, kh, vh, topk_index, scale=self.scale,
                            backend=backend, key_mask=key_mask)
        out = rearrange(out, 'n m (j i) (h w) c -> n (j h) (i w) (m c)',
                        j=nw, i=nw, h=rh, w=rw)
        return out, logits, topk_index
