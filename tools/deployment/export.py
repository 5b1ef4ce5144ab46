"""Export the BiFormer backbone to ONNX or a ``torch.export`` program and
check it against eager PyTorch.

Examples::

    # one ONNX graph for any batch/height/width, checked at 224x224 and
    # 256x320 (batch 1 and 2)
    python tools/deployment/export.py tiny --format onnx --shape 224 224 \\
        --dynamic --verify-shape 256 320 --out biformer_tiny.onnx
    # the backbone of a detection config, with its trained weights
    python tools/deployment/export.py \\
        configs/detection/retinanet_biformer_s_coco.py \\
        --checkpoint work_dirs/retinanet/epoch_12.pth \\
        --format torch --shape 800 1216 --dynamic --out backbone.pt2

``CONFIG_OR_ARCH`` is an mmpretrain/mmdet/mmseg config (its
``model.backbone`` is exported) or an arch name (``tiny``, ``small``,
``base``: the backbone with all four outputs). Without ``--dynamic`` the
export accepts only the ``--shape`` size and ``--batch``. The exported file is
run on random inputs at the export size (and each ``--verify-shape``); the
tool exits with status 1 if an output differs from eager by more than
``--atol`` (default 1e-4). ONNX needs the ``onnx`` and ``onnxscript``
packages, its check ``onnxruntime``. See :mod:`mmbiformer.models.export` for
what ``--dynamic`` changes.
"""
import argparse
import os.path as osp
import sys
import time
from typing import List, Optional, Sequence

import torch

import mmbiformer  # noqa: F401  (safe checkpoint loading, registries)
from mmbiformer.models import BiFormer
from mmbiformer.models.checkpoint import load_biformer_checkpoint
from mmbiformer.models.export import (
    describe_ranges,
    export_backbone,
    max_abs_diff,
    min_dynamic_side,
    prepare_for_export,
    run_exported,
    save_exported,
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Export the BiFormer backbone (ONNX or torch.export) and '
        'verify it against eager PyTorch')
    p.add_argument('model', metavar='CONFIG_OR_ARCH',
                   help='a config file (.py) or a BiFormer arch name')
    p.add_argument('--format', choices=['onnx', 'torch'], default='onnx')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   default=[224, 224], help='export input size')
    p.add_argument('--batch', type=int, default=1,
                   help='batch size of a static export (default 1)')
    p.add_argument('--dynamic', action='store_true',
                   help='symbolic batch, height and width (turns on '
                   'auto_pad)')
    p.add_argument('--verify-shape', type=int, nargs=2, action='append',
                   default=[], metavar=('H', 'W'),
                   help='also verify at this size (with --dynamic; '
                   'repeatable)')
    p.add_argument('--out', required=True, help='output file')
    p.add_argument('--checkpoint', help='weights to load (any layout that '
                   "BiFormer's Pretrained init accepts)")
    p.add_argument('--backend', help="attention backend to export with "
                   "(default: the model's; 'official' for ONNX)")
    p.add_argument('--n-win', type=int, default=7,
                   help='regions per side, for an arch name (default 7)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset')
    p.add_argument('--atol', type=float, default=1e-4,
                   help='largest allowed |exported - eager| (default 1e-4)')
    p.add_argument('--cfg-options', nargs='+', default=[],
                   help='config overrides key=value (with a config)')
    return p.parse_args(argv)


def build_backbone(spec: str, n_win: int,
                   cfg_options: Sequence[str] = ()) -> BiFormer:
    """The backbone of config ``spec``, or ``BiFormer(arch=spec)``."""
    if spec.endswith('.py') or osp.isfile(spec):
        from mmengine.config import Config

        from mmbiformer.apis.launch import parse_kv
        cfg = Config.fromfile(spec)
        cfg.merge_from_dict(parse_kv(cfg_options))
        model = cfg.get('model') or {}
        bb = dict(model.get('backbone', model))
        if bb.get('type') != 'BiFormer':
            raise ValueError(f'{spec}: model.backbone is {bb.get("type")!r}, '
                             'not BiFormer')
        bb.pop('type')
        bb.pop('init_cfg', None)  # weights come from --checkpoint
        return BiFormer(**bb)
    return BiFormer(arch=spec, n_win=n_win, out_indices=(0, 1, 2, 3),
                    auto_pad=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    backbone = build_backbone(args.model, args.n_win, args.cfg_options)
    if args.checkpoint:
        load_biformer_checkpoint(backbone, args.checkpoint)
    changed = prepare_for_export(backbone, args.dynamic, args.backend,
                                 args.format)
    if changed['auto_pad']:
        print('[export] --dynamic: auto_pad turned on (inputs of any size '
              'are padded to the region grid inside the attention)')
    if changed['backend']:
        print(f"[export] attention backend: {changed['backend']!r}")
    h, w = args.shape
    t0 = time.time()
    program = export_backbone(backbone, h, w, batch=args.batch,
                              dynamic=args.dynamic)
    if args.dynamic:
        side = min_dynamic_side(backbone)
        print(f'[export] torch.export ranges: {describe_ranges(program)}; '
              f'its guards also need both sides >= {side}')
        if args.format == 'onnx':
            print('[export] the ONNX graph does not check sizes (it matched '
                  'eager below that size in our tests): verify the sizes '
                  'you deploy at with --verify-shape')
    save_exported(program, args.out, args.format, backbone, args.opset)
    print(f'[export] wrote {args.out} ({args.format}, '
          f'{osp.getsize(args.out) / 2**20:.1f} MiB, '
          f'{time.time() - t0:.0f}s)')

    checks: List[tuple] = [(args.batch, h, w)]
    if args.dynamic:
        checks = [(1, h, w), (2, h, w)]
        checks += [(b, vh, vw) for vh, vw in args.verify_shape
                   for b in (1, 2)]
    elif args.verify_shape:
        print('[export] --verify-shape ignored: a static export accepts only '
              '--shape (use --dynamic)')
    worst = 0.
    for b, vh, vw in checks:
        x = torch.randn(b, backbone.in_channels, vh, vw)
        with torch.no_grad():
            expected = backbone(x)
        name = f'{b}x{backbone.in_channels}x{vh}x{vw}'
        try:
            actual = run_exported(args.out, args.format, x)
        except (AssertionError, RuntimeError) as err:
            # torch.export programs check their inputs' sizes
            worst = float('inf')
            print(f'[export] input {name}: rejected by the exported program '
                  f'({str(err).strip().splitlines()[-1]}); it accepts '
                  f'{describe_ranges(program)}, sides >= '
                  f'{min_dynamic_side(backbone)}')
            continue
        diff = max_abs_diff(expected, actual)
        worst = max(worst, diff)
        print(f'[export] input {name}: max |exported - eager| = {diff:.2e}')
    ok = worst <= args.atol
    print(f'[export] {"OK" if ok else "FAILED"}: largest difference '
          f'{worst:.2e} (atol {args.atol:g})')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
