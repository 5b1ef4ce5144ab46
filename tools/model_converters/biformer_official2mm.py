"""Convert an official BiFormer checkpoint to the OpenMMLab layout.

* ImageNet checkpoints (``{'model': ...}``; BiFormer-T/S/B, -STL and
  -STL-nchw) become an mmpretrain ``ImageClassifier`` checkpoint
  (``backbone.*``, ``head.fc.*``; STL-nchw's 1x1 convs as linear weights).
* mmdet/mmseg checkpoints (``state_dict`` with ``backbone.extra_norms``)
  keep their layout with the output norms renamed
  (``backbone.extra_norms.{i}`` -> ``backbone.norm{i}``).

Usage::

    python tools/model_converters/biformer_official2mm.py SRC DST

The key mapping lives in :mod:`mmbiformer.models.checkpoint`.
"""
import argparse
import os.path as osp

import torch
from mmengine.runner.checkpoint import _load_checkpoint

import mmbiformer  # noqa: F401  (safe checkpoint loading on torch >= 2.6)
from mmbiformer.models.checkpoint import convert_official_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert an official BiFormer checkpoint (ImageNet or '
        'mmdet/mmseg) to the OpenMMLab layout.')
    parser.add_argument('src', help='official checkpoint file')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # mmengine's loader: local files, http(s):// and the other schemes
    checkpoint = _load_checkpoint(args.src, map_location='cpu')
    converted, fmt = convert_official_checkpoint(checkpoint)
    dst_dir = osp.dirname(osp.abspath(args.dst))
    if not osp.isdir(dst_dir):
        raise SystemExit(f'Output directory {dst_dir} does not exist')
    torch.save(converted, args.dst)
    state_dict = converted['state_dict']
    print(f'{args.src}: format {fmt}; wrote {len(state_dict)} tensors to '
          f'{args.dst}')


if __name__ == '__main__':
    main()
