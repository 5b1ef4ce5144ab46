"""The BiFormer backbone (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023) as an mmengine ``BaseModule``.

One class serves classification (mmpretrain), detection (mmdet) and
segmentation (mmseg); :mod:`mmbiformer.registry` registers it as
``BiFormer`` in each toolbox that is installed.
"""
import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import BiLevelRoutingAttention
from ..ops.bra import check_backend
from ..ops.module import PAD_MODES
from .layers import BiFormerBlock, GlobalAttention, LayerNorm2d

ARCH_KEYS = ('embed_dims', 'depths', 'head_dim', 'mlp_ratios', 'topks')
#: optional arch keys and their defaults (those of BiFormer-T/S/B)
ARCH_DEFAULTS = dict(qk_dims=None, stem='conv', pos_embed=True,
                     global_lepe='x', pad_mode='legacy')
OPTIONAL_ARCH_KEYS = tuple(ARCH_DEFAULTS)
STEMS = ('conv', 'patch')
OUT_NORMS = ('bn', 'ln', None)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) \
        and value > 0


#: BiFormer-STL (the official ablation model): Swin-T's layout, no
#: position-embedding conv
_STL = dict(
    embed_dims=[96, 192, 384, 768],
    depths=[2, 2, 6, 2],
    head_dim=32,
    mlp_ratios=[4, 4, 4, 4],
    topks=[1, 4, 16, -2],
    stem='patch',
    pos_embed=False)


class BiFormer(BaseModule):
    """BiFormer backbone.

    Architecture (as the official model): a convolutional stem (Conv3x3 s2
    to ``C0/2``, BN, GELU, Conv3x3 s2 to ``C0``, BN) and between stages a
    Conv3x3 s2 + BN (``stem='conv'``), or Swin's layout (``stem='patch'``,
    BiFormer-STL: a Conv4x4 s4 + BN patch embedding, BN + Conv2x2 s2 patch
    merging); four stages of :class:`~.layers.BiFormerBlock`. Stages
    with ``topk > 0`` use bi-level routing attention
    (:class:`mmbiformer.ops.BiLevelRoutingAttention`, ``num_heads = C //
    head_dim``, ``qk_dim`` = ``qk_dims[i]``, LePE 5x5); a stage with
    ``topk == -2`` uses global attention with LePE and 8 heads
    (:class:`~.layers.GlobalAttention`), ``topk == -1`` the same without
    LePE.

    Args:
        arch (str | dict): ``'tiny'``, ``'small'``, ``'base'``, ``'stl'``,
            ``'stl_nchw'`` or a dict with keys ``embed_dims``, ``depths``,
            ``head_dim``, ``mlp_ratios``, ``topks`` and optionally
            ``qk_dims`` (defaults to ``embed_dims``), ``stem`` (``'conv'``
            or ``'patch'``), ``pos_embed`` (the per-block depthwise conv;
            True), ``global_lepe`` (what the LePE of the global attention
            convolves, ``'x'`` or ``'v'``) and ``pad_mode`` (the default of
            the argument below; ``'legacy'``). ``'stl'`` and ``'stl_nchw'``
            are the official ablation models BiFormer-STL and
            BiFormer-STL-nchw (Swin-T layout: patch stem, no position
            conv, depths 2-2-6-2, widths 96-768, MLP ratio 4, ``n_win`` 7 in
            every stage); ``'stl_nchw'`` has the rules of the refactored
            official op (``pad_mode='after_qkv'``) and a LePE of ``v`` in the
            last stage. Its checkpoints' 1x1 convs are our linear layers
            (see :mod:`~.checkpoint`). Defaults to ``'tiny'``.
        in_channels (int): Input channels. Defaults to 3.
        n_win (int): Regions per side of the routing grid. Official values:
            7 (classification at 224), 16 (detection), 8 (segmentation).
        out_indices (Sequence[int] | int): Stages whose outputs are returned
            (negative values count from the end). Defaults to ``(3, )``.
        out_norm (str | None): Norm on each returned output: ``'bn'``
            (BatchNorm2d, the official classification norm after the last
            stage), ``'ln'`` (LayerNorm over channels, eps 1e-6, the official
            dense-prediction norm) or ``None``. ``'auto'`` (default) means
            ``'bn'`` when ``out_indices == (3, )`` and ``'ln'`` otherwise.
        drop_path_rate (float): Stochastic depth rate, increased linearly
            over all blocks. Defaults to 0.
        side_dwconv (int): LePE kernel size. Defaults to 5.
        pos_embed_kernel (int): Kernel of the per-block depthwise conv
            position embedding. Defaults to 3.
        global_attn_heads (int): Heads of the ``topk < 0`` global attention
            (8 in the official models whatever the width). Defaults to 8.
        auto_pad (bool): Pad feature maps whose size is not a multiple of
            ``n_win`` inside each routing attention (and crop back). Without
            it such inputs raise a ``ValueError``. Defaults to False.
        pad_mode (str, optional): ``'legacy'`` (the official behaviour:
            zero padding before the qkv projection, padded tokens take part
            in routing and attention), ``'masked'`` (padded tokens are
            ignored) or ``'after_qkv'`` (the official STL-nchw rules, see
            :class:`mmbiformer.ops.BiLevelRoutingAttention`). None (default)
            takes the arch's: ``'after_qkv'`` for ``'stl_nchw'``, else
            ``'legacy'``.
        attn_backend (str): Backend of the routing attention (``'auto'``,
            ``'cpu'``, ``'triton'``, ``'torch'``, ``'official'``,
            ``'reference'``; see :mod:`mmbiformer.ops.bra`); changeable
            later through :attr:`attn_backend`. The model itself makes no
            device or dtype decisions: the registered operator does.
        norm_cfg (dict): Norm of the stem/downsampling convs and of the
            ``'bn'`` output norm. Defaults to ``dict(type='BN')``.
        frozen_stages (int): Stages (with their downsampling layers and
            output norms) to freeze; 0 freezes nothing. Defaults to 0.
        norm_eval (bool): Keep BatchNorm layers in eval mode during training.
        with_cp (bool): Activation checkpointing of every block.
        check_finite (bool): Raise a ``ValueError`` naming the images when
            the input holds NaN or Inf (one reduction over the input per
            forward; on a GPU it also waits for the device). Defaults to
            False: see "Bad input" below.
        init_cfg (dict | list[dict], optional): Initialisation config.
            ``dict(type='Pretrained', checkpoint=..., prefix=...)`` accepts
            official ImageNet checkpoints (``{'model': ...}``), official
            mmdet/mmseg checkpoints (``backbone.*`` with ``extra_norms``) and
            this project's layout; see :mod:`mmbiformer.models.checkpoint`.

    Inputs and outputs:
        ``x`` (N, in_channels, H, W) -> tuple of (N, C_i, H_i, W_i) for ``i``
        in ``out_indices``, with ``C_i = embed_dims[i]`` and ``H_i =
        ceil(H / 2 ** (i + 2))`` (likewise ``W_i``); with ``stem='patch'``
        (the STL archs) ``H_i = H // 2 ** (i + 2)``, so their inputs need
        sides of at least 32.

    Bad input:
        * Configuration errors (unknown ``arch``, ``attn_backend`` or
          ``pad_mode``, ``n_win`` not a positive int, a ``topks`` entry
          larger than the ``n_win ** 2`` regions, ``in_channels`` not a
          positive int) raise ``ValueError`` at construction, naming the key
          and the allowed values.
        * ``forward`` raises ``ValueError`` for an input that is not 4-D,
          whose channel count is not ``in_channels``, whose height or width
          is 0; and ``TypeError`` for an input that is not floating point
          (e.g. ``uint8`` images: convert with ``.float()`` and normalise)
          or whose floating dtype differs from the weights' one outside
          ``torch.autocast`` (e.g. a ``float16`` input to a ``float32``
          model: convert the input or the model, or use autocast).
        * Sizes: with ``auto_pad=True`` any ``H, W >= 1`` works, including
          images smaller than the region grid (e.g. 32x32 with ``n_win=7``:
          the maps are padded to the grid inside each routing attention and
          cropped back) and elongated images; without it, an input whose
          routing stages' maps are not multiples of ``n_win`` raises a
          ``ValueError`` naming the multiple to use.
        * An empty batch (``N == 0``) returns empty outputs of the usual
          shapes, in training mode too (the BatchNorm running statistics are
          left unchanged).
        * NaN/Inf: by default the input is not scanned; a non-finite value
          makes that image's outputs NaN (in eval mode only that image's:
          images do not interact) and, in training mode, the BatchNorm batch
          statistics and so every image of the batch and the running
          statistics. Set ``check_finite=True`` to get a ``ValueError``
          naming the images instead.
    """

    arch_zoo: Dict[str, dict] = {
        'tiny': dict(
            embed_dims=[64, 128, 256, 512],
            depths=[2, 2, 8, 2],
            head_dim=32,
            mlp_ratios=[3, 3, 3, 3],
            topks=[1, 4, 16, -2]),
        'small': dict(
            embed_dims=[64, 128, 256, 512],
            depths=[4, 4, 18, 4],
            head_dim=32,
            mlp_ratios=[3, 3, 3, 3],
            topks=[1, 4, 16, -2]),
        'base': dict(
            embed_dims=[96, 192, 384, 768],
            depths=[4, 4, 18, 4],
            head_dim=32,
            mlp_ratios=[3, 3, 3, 3],
            topks=[1, 4, 16, -2]),
        # the official ablation models (Swin-T layout); their last stage
        # is the 8-head global attention with LePE
        'stl': _STL,
        # the same with 1x1-conv projections (same parameters), LePE of v in
        # the last stage and its own padding rules
        'stl_nchw': dict(_STL, global_lepe='v', pad_mode='after_qkv'),
    }
    arch_zoo['t'] = arch_zoo['tiny']
    arch_zoo['s'] = arch_zoo['small']
    arch_zoo['b'] = arch_zoo['base']

    num_stages = 4

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 n_win: int = 7,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 out_norm: Optional[str] = 'auto',
                 drop_path_rate: float = 0.,
                 side_dwconv: int = 5,
                 pos_embed_kernel: int = 3,
                 global_attn_heads: int = 8,
                 auto_pad: bool = False,
                 pad_mode: Optional[str] = None,
                 attn_backend: str = 'auto',
                 norm_cfg: Optional[dict] = None,
                 frozen_stages: int = 0,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 check_finite: bool = False,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        norm_cfg = norm_cfg or dict(type='BN')
        self.arch_settings = self._parse_arch(arch)
        if pad_mode is None:
            pad_mode = self.arch_settings['pad_mode']
        self._check_config(in_channels, n_win, attn_backend, pad_mode)
        embed_dims = self.arch_settings['embed_dims']
        depths = self.arch_settings['depths']
        head_dim = self.arch_settings['head_dim']
        mlp_ratios = self.arch_settings['mlp_ratios']
        topks = self.arch_settings['topks']
        qk_dims = self.arch_settings['qk_dims']
        self.embed_dims = embed_dims
        self.depths = depths

        self.out_indices = self._parse_out_indices(out_indices)
        if out_norm == 'auto':
            out_norm = 'bn' if self.out_indices == (3, ) else 'ln'
        if out_norm not in OUT_NORMS:
            raise ValueError(f"out_norm must be 'auto', 'bn', 'ln' or None, "
                             f'got {out_norm!r}')
        self.out_norm = out_norm
        self.n_win = n_win
        self.auto_pad = auto_pad
        self.pad_mode = pad_mode
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.in_channels = in_channels
        self.check_finite = check_finite
        #: report of the last ``Pretrained`` load (see ``init_weights``)
        self.checkpoint_report: Optional[dict] = None

        self.downsample_layers = self._make_downsampling(
            self.arch_settings['stem'], in_channels, embed_dims, norm_cfg)

        dpr = torch.linspace(
            0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(self.num_stages):
            blocks = []
            for j in range(depths[i]):
                attn = self._make_attn(embed_dims[i], qk_dims[i], head_dim,
                                       topks[i], side_dwconv,
                                       global_attn_heads, attn_backend)
                blocks.append(
                    BiFormerBlock(
                        embed_dims[i],
                        attn,
                        mlp_ratio=mlp_ratios[i],
                        drop_path=dpr[cur + j],
                        pos_embed_kernel=(pos_embed_kernel
                                          if self.arch_settings['pos_embed']
                                          else 0)))
            self.stages.append(nn.ModuleList(blocks))
            cur += depths[i]

        # per-output norms: norm{i}
        for i in self.out_indices:
            if out_norm == 'bn':
                layer = build_norm_layer(norm_cfg, embed_dims[i])[1]
            elif out_norm == 'ln':
                layer = LayerNorm2d(embed_dims[i], eps=1e-6)
            else:
                layer = nn.Identity()
            self.add_module(f'norm{i}', layer)

        self._freeze_stages()

    # ------------------------------------------------------------- building
    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            name = arch.lower()
            if name not in cls.arch_zoo:
                raise ValueError(
                    f'Unknown BiFormer arch {arch!r}; choose one of '
                    f'{sorted(cls.arch_zoo)} or pass a dict with keys '
                    f'{list(ARCH_KEYS)} (and optionally '
                    f'{list(OPTIONAL_ARCH_KEYS)}).')
            settings = copy.deepcopy(cls.arch_zoo[name])
        elif isinstance(arch, dict):
            missing = [k for k in ARCH_KEYS if k not in arch]
            unknown = [
                k for k in arch if k not in ARCH_KEYS + OPTIONAL_ARCH_KEYS
            ]
            if missing or unknown:
                raise ValueError(
                    f'A custom BiFormer arch needs the keys {list(ARCH_KEYS)}'
                    f' (optional: {list(OPTIONAL_ARCH_KEYS)}); missing '
                    f'{missing}, unknown {unknown}.')
            settings = copy.deepcopy(dict(arch))
        else:
            raise TypeError(
                f'arch must be a str or a dict, got {type(arch).__name__}')

        for key, default in ARCH_DEFAULTS.items():
            settings.setdefault(key, default)
        if settings['stem'] not in STEMS:
            raise ValueError(f"arch['stem'] must be one of {STEMS}, got "
                             f"{settings['stem']!r}")
        if settings['global_lepe'] not in ('x', 'v'):
            raise ValueError("arch['global_lepe'] must be 'x' or 'v', got "
                             f"{settings['global_lepe']!r}")
        if settings['qk_dims'] is None:
            settings['qk_dims'] = list(settings['embed_dims'])
        for key in ('embed_dims', 'depths', 'mlp_ratios', 'topks',
                    'qk_dims'):
            value = settings[key]
            if not isinstance(value, (list, tuple)) or \
                    len(value) != cls.num_stages:
                raise ValueError(
                    f'arch[{key!r}] must be a sequence of {cls.num_stages} '
                    f'values, got {value!r}')
            settings[key] = list(value)
        for i, topk in enumerate(settings['topks']):
            if not (topk > 0 or topk in (-1, -2)):
                raise ValueError(
                    f'arch topks[{i}] = {topk}: use a positive region count '
                    '(bi-level routing attention), -2 (global attention with '
                    'LePE) or -1 (global attention)')
        return settings

    def _check_config(self, in_channels: int, n_win: int, attn_backend: str,
                      pad_mode: str) -> None:
        """Build-time checks of the keys the blocks do not check with the
        backbone's names (errors name the key and the allowed values)."""
        if not _is_positive_int(in_channels):
            raise ValueError(f'in_channels must be a positive int (3 for RGB '
                             f'images), got {in_channels!r}')
        check_backend(attn_backend)
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode={pad_mode!r} is not supported; choose '
                             f'one of {PAD_MODES}')
        topks = self.arch_settings['topks']
        if not any(k > 0 for k in topks):
            return  # no routing stage: n_win is not used
        if not _is_positive_int(n_win):
            raise ValueError(
                f'n_win must be a positive int (regions per side of the '
                f'routing grid; the official values are 7 for classification '
                f'at 224, 16 for detection, 8 for segmentation), got '
                f'{n_win!r}')
        for i, topk in enumerate(topks):
            if topk > n_win * n_win:
                raise ValueError(
                    f'arch topks[{i}]={topk} routes to more regions than the '
                    f'n_win**2={n_win * n_win} of n_win={n_win}; use n_win >= '
                    f'{math.ceil(math.sqrt(topk))} or topks[{i}] <= '
                    f'{n_win * n_win}')

    def _parse_out_indices(
            self, out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        parsed = []
        for index in out_indices:
            i = index + self.num_stages if index < 0 else index
            if not 0 <= i < self.num_stages:
                raise ValueError(f'Invalid out_indices entry {index} for '
                                 f'{self.num_stages} stages')
            parsed.append(i)
        if len(set(parsed)) != len(parsed):
            raise ValueError(f'Duplicate out_indices: {out_indices}')
        return tuple(sorted(parsed))

    @staticmethod
    def _make_downsampling(stem: str, in_channels: int,
                           embed_dims: List[int],
                           norm_cfg: dict) -> nn.ModuleList:
        """The stem and the three downsampling layers, with the official
        names and indices (``downsample_layers.{i}.{j}``)."""
        c0 = embed_dims[0]
        if stem == 'patch':  # Swin's patch embedding and patch merging
            layers = [nn.Sequential(
                nn.Conv2d(in_channels, c0, 4, stride=4),
                build_norm_layer(norm_cfg, c0)[1])]
            for i in range(1, len(embed_dims)):
                layers.append(nn.Sequential(
                    build_norm_layer(norm_cfg, embed_dims[i - 1])[1],
                    nn.Conv2d(embed_dims[i - 1], embed_dims[i], 2,
                              stride=2)))
            return nn.ModuleList(layers)
        layers = [nn.Sequential(
            nn.Conv2d(in_channels, c0 // 2, 3, stride=2, padding=1),
            build_norm_layer(norm_cfg, c0 // 2)[1],
            nn.GELU(),
            nn.Conv2d(c0 // 2, c0, 3, stride=2, padding=1),
            build_norm_layer(norm_cfg, c0)[1],
        )]
        for i in range(1, len(embed_dims)):
            layers.append(nn.Sequential(
                nn.Conv2d(embed_dims[i - 1], embed_dims[i], 3, stride=2,
                          padding=1),
                build_norm_layer(norm_cfg, embed_dims[i])[1]))
        return nn.ModuleList(layers)

    def _make_attn(self, dim: int, qk_dim: int, head_dim: int, topk: int,
                   side_dwconv: int, global_attn_heads: int,
                   attn_backend: str) -> nn.Module:
        if topk > 0:
            if dim % head_dim != 0:
                raise ValueError(
                    f'width {dim} is not divisible by head_dim {head_dim}')
            return BiLevelRoutingAttention(
                dim,
                num_heads=dim // head_dim,
                n_win=self.n_win,
                qk_dim=qk_dim,
                topk=topk,
                side_dwconv=side_dwconv,
                auto_pad=self.auto_pad,
                pad_mode=self.pad_mode,
                backend=attn_backend)
        return GlobalAttention(
            dim,
            num_heads=global_attn_heads,
            side_dwconv=side_dwconv if topk == -2 else 0,
            lepe_input=self.arch_settings['global_lepe'])

    # ------------------------------------------------------------ backends
    def routing_attentions(self) -> List[nn.Module]:
        """All :class:`BiLevelRoutingAttention` modules of the backbone."""
        return [
            m for m in self.modules()
            if isinstance(m, BiLevelRoutingAttention)
        ]

    @property
    def attn_backend(self) -> Optional[str]:
        """Backend of the routing attentions (None if there are none)."""
        attns = self.routing_attentions()
        return attns[0].backend if attns else None

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        check_backend(backend)
        for m in self.routing_attentions():
            m.backend = backend

    # ------------------------------------------------------ initialisation
    #: the official ``_init_weights``: trunc_normal(std .02, cut at +-2)
    #: Linear weights, zero biases; LayerNorm weight 1, bias 0
    official_init_cfg = [
        dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
        dict(type='Constant', layer='LayerNorm', val=1., bias=0.),
    ]

    def init_weights(self) -> None:
        """Initialise as the official model, then load a checkpoint if any.

        The official initialisation runs first, followed by the
        non-``Pretrained`` entries of ``init_cfg`` (which may override it).
        With ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=...)``
        the checkpoint format is then detected and its keys are mapped in
        memory (:func:`mmbiformer.models.checkpoint.load_biformer_checkpoint`
        ); the load is non-strict and a report of renamed, dropped, missing
        and unexpected keys is logged.
        """
        from .checkpoint import load_biformer_checkpoint

        if self._is_init:
            return super().init_weights()  # mmengine warns about re-init
        cfgs = self.init_cfg or []
        if isinstance(cfgs, dict):
            cfgs = [cfgs]
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        others = [c for c in cfgs if c.get('type') != 'Pretrained']
        if len(pretrained) > 1:
            raise ValueError('BiFormer accepts one Pretrained init_cfg, got '
                             f'{len(pretrained)}')

        original = self.init_cfg
        self.init_cfg = copy.deepcopy(self.official_init_cfg) + others
        try:
            super().init_weights()
        finally:
            self.init_cfg = original
        if pretrained:
            cfg = pretrained[0]
            self.checkpoint_report = load_biformer_checkpoint(
                self,
                cfg['checkpoint'],
                prefix=cfg.get('prefix'),
                map_location=cfg.get('map_location', 'cpu'))

    # ------------------------------------------------------------- forward
    def _check_size(self, stage: int, h: int, w: int) -> None:
        if self.auto_pad or self.arch_settings['topks'][stage] <= 0:
            return
        if h % self.n_win or w % self.n_win:
            last = max(i for i, k in enumerate(self.arch_settings['topks'])
                       if k > 0)
            scale = 2**(last + 2)
            raise ValueError(
                f'BiFormer stage {stage + 1} gets a {h}x{w} feature map, not '
                f'divisible by n_win={self.n_win}. Use auto_pad=True, or '
                f'inputs whose sides are multiples of {scale * self.n_win} '
                f'(n_win x {scale}, the stride of the last routing stage).')

    def _check_input(self, x: torch.Tensor) -> None:
        """Cheap checks of the input batch (see "Bad input" in the class
        doc): shape and dtype only, unless ``check_finite``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'BiFormer expects a tensor (N, {self.in_channels}'
                            f', H, W), got {type(x).__name__}')
        if x.dim() != 4:
            hint = (' (a single image? add the batch dimension with x[None])'
                    if x.dim() == 3 else '')
            raise ValueError(
                f'BiFormer expects a 4-D batch (N, {self.in_channels}, H, W), '
                f'got shape {tuple(x.shape)}{hint}')
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f'BiFormer(in_channels={self.in_channels}) got an input with '
                f'{x.shape[1]} channels (shape {tuple(x.shape)}); convert the '
                f'images to {self.in_channels} channels (channels first, NCHW)'
                f' or build the backbone with in_channels={x.shape[1]}')
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'BiFormer got an empty image: input shape '
                             f'{tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(
                f'BiFormer got a {x.dtype} input; convert it with .float() '
                '(and normalise it like the training data, e.g. with the '
                'model\'s data preprocessor) first')
        weight = self.downsample_layers[0][0].weight
        if x.dtype != weight.dtype:
            device = x.device.type
            autocast = (torch.is_autocast_enabled(device)
                        and x.dtype in (torch.float32,
                                        torch.get_autocast_dtype(device)))
            if not autocast:
                raise TypeError(
                    f'BiFormer got a {x.dtype} input but its weights are '
                    f'{weight.dtype}; convert the input with '
                    f'.to({weight.dtype}), the model with .to({x.dtype}), or '
                    'run under torch.autocast for mixed precision')
        if self.check_finite and not torch.compiler.is_exporting():
            bad = ~torch.isfinite(x).flatten(1).all(dim=1)
            if bool(bad.any()):
                raise ValueError(
                    'BiFormer(check_finite=True): the input holds NaN or Inf '
                    f'in images {bad.nonzero().flatten().tolist()} of the '
                    'batch; check the data pipeline (decoding, '
                    'normalisation, augmentation)')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(N, C_in, H, W) -> tuple of (N, C_i, H_i, W_i), see class doc."""
        self._check_input(x)
        # channels-last memory from the stem on: the blocks work on NHWC
        # views (no permute copies) and the depthwise convs run faster
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for i in range(self.num_stages):
            x = self.downsample_layers[i](x)
            self._check_size(i, x.shape[2], x.shape[3])
            for block in self.stages[i]:
                if self.with_cp and self.training and x.requires_grad:
                    x = cp.checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            if i in self.out_indices:
                # returned in the default (NCHW-contiguous) layout, as the
                # toolboxes' backbones return theirs: mmcv's RoIAlign reads
                # its input's memory as NCHW whatever the strides, and on
                # channels-last FPN maps pooled wrong values
                outs.append(getattr(self, f'norm{i}')(x).contiguous())
        return tuple(outs)

    # ------------------------------------------------------------- training
    def _freeze_stages(self) -> None:
        for i in range(min(self.frozen_stages, self.num_stages)):
            modules = [self.downsample_layers[i], self.stages[i]]
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
            for m in modules:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> 'BiFormer':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def output_shapes(self, height: int,
                      width: int) -> List[Tuple[int, int, int]]:
        """(C_i, H_i, W_i) of each output for an ``height x width`` input."""
        shapes = []
        for i in self.out_indices:
            s = 2**(i + 2)
            if self.arch_settings['stem'] == 'patch':  # unpadded strided
                shapes.append((self.embed_dims[i], height // 4 // (s // 4),
                               width // 4 // (s // 4)))
            else:
                shapes.append((self.embed_dims[i], math.ceil(height / s),
                               math.ceil(width / s)))
        return shapes
