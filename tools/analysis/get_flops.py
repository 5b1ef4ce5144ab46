"""Parameters and FLOPs of BiFormer models (fvcore convention).

Examples::

    # the official ImageNet models (1000 classes) at 224x224
    python tools/analysis/get_flops.py
    python tools/analysis/get_flops.py --arch tiny --shape 224 --backend fused
    # any mmpretrain / mmdet / mmseg config
    python tools/analysis/get_flops.py configs/...py --shape 512 512

FLOPs are counted with ``mmengine.analysis.FlopAnalyzer`` (one multiply-add
is one FLOP, as fvcore and the BiFormer paper); the routing attention's
fused ops are counted too, so every ``--backend`` reports the same number.
BatchNorm is counted as in the published numbers (see
:mod:`mmbiformer.models.complexity`; ``--bn-count eval`` for fvcore's
inference count).
"""
import argparse
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

# importing mmbiformer registers BiFormer into the toolboxes' registries
from mmbiformer.models.biformer import BiFormer
from mmbiformer.models.complexity import count_params, flop_analysis


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs of BiFormer models')
    parser.add_argument(
        'config', nargs='?', help='a model config (default: --arch models)')
    parser.add_argument(
        '--arch',
        nargs='+',
        default=['tiny', 'small', 'base'],
        help='BiFormer archs to build as ImageNet classifiers when no config '
        'is given')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=[224], help='input H [W]')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--n-win', type=int, default=7)
    parser.add_argument(
        '--backend',
        default=None,
        help="attention backend ('auto', 'torch', 'official', ...; "
        "default: the config's, 'auto' for --arch)")
    parser.add_argument(
        '--bn-count',
        choices=['official', 'eval'],
        default='official',
        help="BatchNorm counted as fvcore does in training mode, like the "
        "published BiFormer numbers ('official'), or in eval mode")
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        default=[],
        help='config overrides key=value (with a config)')
    return parser.parse_args()


def classifier_cfg(arch: str, num_classes: int, n_win: int,
                   backend: str) -> dict:
    """An mmpretrain ImageClassifier config with the official head."""
    width = BiFormer.arch_zoo[arch]['embed_dims'][-1]
    return dict(
        type='ImageClassifier',
        backbone=dict(
            type='BiFormer', arch=arch, n_win=n_win, attn_backend=backend),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead', num_classes=num_classes, in_channels=width))


def build_from_config(path: str, cfg_options: Sequence[str]) -> nn.Module:
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from mmbiformer.apis.launch import parse_kv
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(parse_kv(cfg_options))
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    return MODELS.build(cfg.model)


def stage_flops(by_module: Dict[str, int], prefix: str,
                num_stages: int) -> List[int]:
    """FLOPs of downsampling layer i + stage i (+ its output norm)."""
    flops = []
    for i in range(num_stages):
        flops.append(
            sum(
                by_module.get(f'{prefix}{name}', 0)
                for name in (f'downsample_layers.{i}', f'stages.{i}',
                             f'norm{i}')))
    return flops


def report(name: str, model: nn.Module, shape: Sequence[int],
           backend: Optional[str], bn_count: str) -> None:
    backbone = model.backbone if hasattr(model, 'backbone') else model
    if backend is not None and isinstance(backbone, BiFormer):
        backbone.attn_backend = backend
    inputs = torch.randn(1, 3, *shape)
    total, by_module = flop_analysis(model, inputs, bn_count)
    params = count_params(model)
    print(f'{name}: input 3x{shape[0]}x{shape[1]}, params {params:,} '
          f'({params / 1e6:.2f} M), FLOPs {total:,} ({total / 1e9:.2f} G; '
          f'BatchNorm counted {bn_count!r})')
    if isinstance(backbone, BiFormer):
        prefix = 'backbone.' if backbone is not model else ''
        per_stage = stage_flops(by_module, prefix, backbone.num_stages)
        parts = ', '.join(f'stage{i + 1} {f / 1e9:.3f} G'
                          for i, f in enumerate(per_stage))
        rest = total - sum(per_stage)
        print(f'    {parts}, rest (heads, necks) {rest / 1e9:.3f} G; '
              f'attention backend {backbone.attn_backend!r}')


def main() -> None:
    args = parse_args()
    if len(args.shape) == 1:
        shape = (args.shape[0], args.shape[0])
    elif len(args.shape) == 2:
        shape = tuple(args.shape)
    else:
        raise SystemExit('--shape takes H or H W')
    torch.manual_seed(0)
    if args.config:
        model = build_from_config(args.config, args.cfg_options)
        report(args.config, model, shape, args.backend, args.bn_count)
        return
    from mmpretrain.registry import MODELS
    for arch in args.arch:
        model = MODELS.build(
            classifier_cfg(arch, args.num_classes, args.n_win, args.backend
                           or 'auto'))
        report(f'biformer_{arch}', model, shape, None, args.bn_count)


if __name__ == '__main__':
    main()
