"""``BiLevelRoutingAttention``: the BRA layer of BiFormer as an nn.Module."""
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bra import BACKENDS, bra, check_backend
from .routing import floor_region_grid, region_graph

__all__ = ['BACKENDS', 'BiLevelRoutingAttention', 'PAD_MODES', 'QKVLinear']

PAD_MODES = ('legacy', 'masked', 'after_qkv')


class QKVLinear(nn.Module):
    """One linear layer producing ``q | k | v`` along channels, kept as a
    submodule so that its parameters are named ``qkv.qkv.*`` as in the
    official checkpoints."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(..., dim)`` -> q ``(..., qk_dim)``, k ``(..., qk_dim)``, v
        ``(..., dim)``."""
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim],
                                 dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BiFormer, CVPR 2023).

    The map is cut into ``n_win x n_win`` regions; every region routes to
    the ``topk`` regions whose mean key best matches its mean query (one
    routing for all heads, :func:`~.routing.region_graph`), then its tokens
    attend to the tokens of those regions (:func:`~.bra.bra`). A depthwise
    conv of ``v`` (LePE) is added before the output projection ``wo``.

    Args:
        dim: channels ``C`` of the input and output.
        num_heads: attention heads; must divide ``qk_dim`` and ``dim``.
        n_win: regions per side.
        qk_dim: query/key channels (default ``dim``).
        qk_scale: logit scale (default ``qk_dim ** -0.5``: over all heads,
            like the official code).
        topk: routed regions per region, ``1 <= topk <= n_win ** 2``.
        side_dwconv: LePE kernel size (odd; ``0`` disables the LePE).
        auto_pad: zero-pad bottom/right to multiples of ``n_win`` (else the
            map must be divisible by ``n_win``); the output is cropped back.
        pad_mode: ``'legacy'`` (padded tokens go through ``qkv`` and take
            part in routing and attention, as in the official code),
            ``'masked'`` (they are left out of the region means and are no
            keys) or ``'after_qkv'``, the rules of the official
            BiFormer-STL-nchw: regions of ``(H // n_win, W // n_win)``
            tokens, as many as cover the map
            (:func:`~.routing.floor_region_grid`), region means over the
            real tokens only, ``q``, ``k`` and ``v`` zero-padded after the
            projection, the padded keys inside the softmax (as zero logits
            with zero values), the LePE of the unpadded ``v`` (the same as
            the LePE of the zero-padded ``v``, cropped). Where ``n_win``
            divides the map all three modes are the same.
        backend: attention backend (see :mod:`mmbiformer.ops.bra`); a plain
            attribute that can be changed at any time.

    Shapes:
        ``forward(x)``: ``x`` ``(N, H, W, C)`` -> ``(N, H, W, C)``. With
        ``return_routing=True`` also a dict with ``topk_index`` ``(N, R,
        topk)``, ``routing_logits`` ``(N, R, R)`` (detached), ``n_win``,
        ``padded_hw`` ``(Hp, Wp)``, ``region_hw`` ``(Hp // n_win, Wp //
        n_win)`` and ``backend``, with ``R = n_win ** 2`` (``n_win`` is the
        grid of this call: more than the layer's for ``'after_qkv'`` on a
        map that it does not divide).
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
        check_backend(backend)
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.topk = topk
        self.side_dwconv = side_dwconv
        self.auto_pad = auto_pad
        self.pad_mode = pad_mode
        self.backend = backend

        self.qkv = QKVLinear(dim, qk_dim)
        self.wo = nn.Linear(dim, dim)
        if side_dwconv > 0:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv,
                                  padding=side_dwconv // 2, groups=dim)
        else:
            self.lepe = None

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, '
                f'n_win={self.n_win}, qk_dim={self.qk_dim}, '
                f'topk={self.topk}, auto_pad={self.auto_pad}, '
                f'pad_mode={self.pad_mode!r}, backend={self.backend!r}')

    def _pads(self, h: int, w: int) -> Tuple[int, int, bool]:
        """Bottom and right padding to the region grid, and whether to pad
        (when exporting with ``auto_pad``: always, possibly by zero, so
        that one exported graph serves every input size)."""
        nw = self.n_win
        # from ceil(size / n_win): under torch.export the padded size is
        # then provably a multiple of n_win
        pad_b = (h + nw - 1) // nw * nw - h
        pad_r = (w + nw - 1) // nw * nw - w
        if self.auto_pad and torch.compiler.is_exporting():
            return pad_b, pad_r, True  # no branch on the (symbolic) size
        if not (pad_b or pad_r):
            return 0, 0, False
        if not self.auto_pad:
            smaller = h < nw or w < nw
            raise ValueError(
                f'feature map {h}x{w} is '
                + (f'smaller than the {nw}x{nw} region grid' if smaller else
                   'not divisible by the region grid')
                + f' (n_win={nw}); set auto_pad=True or '
                + (f'use n_win <= {min(h, w)}' if smaller else
                   f'resize the input to a multiple of {nw}'))
        return pad_b, pad_r, True

    def _pads_after_qkv(self, h: int, w: int) -> Tuple[int, int, bool]:
        """Bottom and right padding of ``pad_mode='after_qkv'`` (to the
        square grid of :func:`~.routing.floor_region_grid`)."""
        if h % self.n_win == 0 and w % self.n_win == 0:
            return 0, 0, False
        if not self.auto_pad:
            self._pads(h, w)  # raises the error of the other modes
        rh, rw, g = floor_region_grid(h, w, self.n_win)
        return g * rh - h, g * rw - w, True

    def forward(self, x: Tensor, return_routing: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Dict[str, Any]]]:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                'BiLevelRoutingAttention expects channels-last input (N, H, '
                f'W, C={self.dim}), got shape {tuple(x.shape)}')
        _, h, w, _ = x.shape
        n_win = self.n_win
        if self.pad_mode == 'after_qkv':
            pad_b, pad_r, padded = self._pads_after_qkv(h, w)
            q, k, v = self.qkv(x)
            if padded:
                q, k, v = (F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
                           for t in (q, k, v))
                n_win = floor_region_grid(h, w, self.n_win)[2]
        else:
            pad_b, pad_r, padded = self._pads(h, w)
            if padded:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            q, k, v = self.qkv(x)
        key_valid = None
        if padded and self.pad_mode != 'legacy':
            rows = torch.arange(q.shape[1], device=q.device) < h
            cols = torch.arange(q.shape[2], device=q.device) < w
            key_valid = rows[:, None] & cols

        graph = region_graph(q, k, n_win, self.topk, self.scale, key_valid,
                             mask_keys=self.pad_mode == 'masked')
        out = bra(q, k, v, graph, self.num_heads, self.scale, self.backend)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)

        if padded and torch.compiler.is_exporting():
            # index_select, not a slice: export would guard on whether the
            # sliced view is contiguous, i.e. specialise on the input size
            out = out.index_select(1, torch.arange(h, device=out.device))
            out = out.index_select(2, torch.arange(w, device=out.device))
        elif padded:
            out = out[:, :h, :w, :].contiguous()
        if not return_routing:
            return out
        hp, wp = h + pad_b, w + pad_r
        info = dict(topk_index=graph.topk_index,
                    routing_logits=graph.routing_logits, n_win=n_win,
                    padded_hw=(hp, wp),
                    region_hw=(hp // n_win, wp // n_win),
                    backend=self.backend)
        return out, info

