"""Make an ImageNet-C-style set from any folder of class folders.

Every image of ``SRC/<class>/`` is corrupted with the ``imagecorruptions``
package at each severity and written to
``DST/<corruption>/<severity>/<class>/`` (ImageNet-C's layout, read by the
``ImageNetC`` dataset). Images are first resized (short side) and centre
cropped to ``--size``, as ImageNet-C was made from 224x224 crops.

Example (the built-in validation images, every corruption)::

    python tools/dataset_converters/make_imagenet_c.py \\
        data/demo/imagenet/val data/demo/imagenet-c

Needs ``imagecorruptions`` (on NumPy 2 and recent scikit-image, the
maintained fork ``imagecorruptions-imaug`` provides the same module; the
1.1.2 release fails there on glass_blur, fog and gaussian_blur).
"""
import argparse
import os
import os.path as osp
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))

from mmbiformer.datasets.imagenet_c import (  # noqa: E402
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
)

_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description='Corrupt a folder of class folders into the ImageNet-C '
        'layout <corruption>/<severity>/<class>/.')
    p.add_argument('src', help='folder of class folders of images')
    p.add_argument('dst', help='output folder')
    p.add_argument(
        '--corruptions', nargs='+', default=['all'],
        help="names, 'benchmark' (the 15 of the mCE), 'extra' (the 4 "
        "held-out ones) or 'all' (default)")
    p.add_argument('--severities', type=int, nargs='+',
                   default=list(SEVERITIES))
    p.add_argument('--size', type=int, default=224,
                   help='resize (short side) and centre crop to this size '
                   'before corrupting (default 224, as ImageNet-C)')
    p.add_argument('--max-per-class', type=int, default=None,
                   help='use at most this many images of each class')
    p.add_argument('--seed', type=int, default=0,
                   help='seed of the random corruptions')
    return p.parse_args(argv)


def corruption_names(names) -> list:
    out = []
    for name in names:
        if name == 'all':
            out += BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
        elif name == 'benchmark':
            out += BENCHMARK_CORRUPTIONS
        elif name == 'extra':
            out += EXTRA_CORRUPTIONS
        elif name in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS:
            out.append(name)
        else:
            raise SystemExit(f'unknown corruption {name!r}; choose from '
                             f'{list(BENCHMARK_CORRUPTIONS)} + '
                             f'{list(EXTRA_CORRUPTIONS)}')
    return list(dict.fromkeys(out))


def list_images(src: str, max_per_class=None) -> list:
    """``[(class, file name, path)]`` of every image, sorted."""
    if not osp.isdir(src):
        raise SystemExit(f'{src} is not a folder')
    images = []
    for cls in sorted(os.listdir(src)):
        folder = osp.join(src, cls)
        if not osp.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(_EXTENSIONS))
        images += [(cls, f, osp.join(folder, f))
                   for f in files[:max_per_class]]
    if not images:
        raise SystemExit(f'no images in the class folders of {src}')
    return images


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)),
                      max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        from imagecorruptions import corrupt
    except ImportError as err:
        raise SystemExit('this tool needs the imagecorruptions package '
                         '(pip install imagecorruptions-imaug, or '
                         'imagecorruptions on NumPy < 2)') from err
    from mmengine.utils import ProgressBar

    names = corruption_names(args.corruptions)
    bad = [s for s in args.severities if s not in SEVERITIES]
    if bad:
        raise SystemExit(f'severities are 1-5, got {bad}')
    images = list_images(args.src, args.max_per_class)
    np.random.seed(args.seed)  # the package draws from numpy's global RNG
    total = len(images) * len(names) * len(args.severities)
    print(f'{len(images)} images x {len(names)} corruptions x '
          f'{len(args.severities)} severities = {total} images -> {args.dst}')
    bar = ProgressBar(total)
    for cls, name, path in images:
        with Image.open(path) as img:
            clean = center_crop(img.convert('RGB'), args.size)
        stem = osp.splitext(name)[0]
        for corruption in names:
            for severity in args.severities:
                out = corrupt(clean, corruption_name=corruption,
                              severity=severity)
                folder = osp.join(args.dst, corruption, str(severity), cls)
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(np.uint8(out)).save(
                    osp.join(folder, stem + '.JPEG'), quality=85)
                bar.update()
    print(f'\nwrote {total} images under {args.dst}')


if __name__ == '__main__':
    main()
