"""Write token-labeling label maps with a teacher classifier.

For every image under IMAGE_DIR (class folders of images, e.g.
``data/imagenet/train``) the teacher, any mmpretrain classifier config and
checkpoint, sees the whole image at ``--size`` px, and the top-k logits and
class indices at every location of its last feature map are saved as
``OUT_DIR/<class folder>/<image stem>.pt``: a float16 tensor ``[2, k, H,
W]``, the format of the released ImageNet label files, which the
token-labeling configs read through ``token_label_root``. A one-line
summary of the files follows (read back): the entropy of the token targets
and how often the maps' top-1 is the image's class (its folder's index
among the sorted class folders).

Usage::

    python tools/dataset_converters/make_token_labels.py CONFIG CHECKPOINT \\
        IMAGE_DIR OUT_DIR [--size 224] [--topk 5] [--batch-size 32]
        [--device cpu] [--skip-existing] [--summary-images 10000]
        [--cfg-options k=v ...]
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='mmpretrain classifier config (teacher)')
    p.add_argument('checkpoint', help='the teacher\'s checkpoint')
    p.add_argument('image_dir', help='folder of class folders of images')
    p.add_argument('out_dir', help='label root to write')
    p.add_argument('--size', type=int, default=224,
                   help='teacher input side; the whole image is resized '
                   'to it (default 224)')
    p.add_argument('--topk', type=int, default=5,
                   help='classes kept per location (default 5)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--device', default='cpu')
    p.add_argument('--skip-existing', action='store_true',
                   help='keep label files that exist already')
    p.add_argument('--summary-images', type=int, default=10000,
                   help='read this many of the written files back (evenly '
                   'spaced) for the one-line summary; 0: no summary '
                   '(default 10000)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='config overrides, key=value')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmbiformer.apis.token_labels import (
        build_teacher,
        format_label_summary,
        summarize_token_labels,
        write_token_labels,
    )
    teacher = build_teacher(args.config, args.checkpoint, args.device,
                            args.cfg_options)
    n = write_token_labels(teacher, args.image_dir, args.out_dir,
                           size=args.size, topk=args.topk,
                           batch_size=args.batch_size,
                           skip_existing=args.skip_existing)
    print(f'wrote {n} label files under {args.out_dir}')
    if args.summary_images > 0:
        num_classes = teacher.head.num_classes
        print(format_label_summary(summarize_token_labels(
            args.image_dir, args.out_dir, num_classes,
            max_images=args.summary_images)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
