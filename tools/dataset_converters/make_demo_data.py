"""Write the built-in demo datasets in the on-disk formats the configs read.

Three small synthetic datasets, deterministic for a given seed:

``<root>/imagenet``
    ImageNet layout as mmpretrain reads it: ``train/<class>/*.JPEG``,
    ``val/<class>/*.JPEG`` and the annotation lists ``meta/train.txt`` /
    ``meta/val.txt`` (``<relative path> <label>`` per line).  One object per
    image; the label of shape class ``k`` is ``k`` (the ImageNet head keeps its
    1000 outputs).
``<root>/coco``
    COCO instances: ``train2017/``, ``val2017/`` and
    ``annotations/instances_{train,val}2017.json`` with boxes and polygon
    masks.  The category list is the 80 COCO categories with their official
    ids, so the toolbox's class list is unchanged; the objects use a subset
    of them as stand-ins (see ``COCO_NAMES``).
``<root>/ade/ADEChallengeData2016``
    ADE20K layout: ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` (single-channel labels,
    0 = "other" which mmseg ignores with ``reduce_zero_label=True``,
    1..150 = ADE20K classes).  Scenes are split into "stuff" regions (sky,
    wall, floor, each with its own surface pattern) with objects on top.

What makes the data learnable in minutes but not trivial: every object
class has its own outline (disc, square, triangle, cross, star, crescent)
*and* its own surface pattern (dots, checks, stripes, grid, speckle, waves),
in random colours (no colour belongs to a class), sizes and rotations, on
cluttered backgrounds (random lines, colour gradients, noise, and
distractor blobs with irregular outlines and smooth two-colour fills).
Classification images are 64 px (objects of 28-51 px), detection images
128 px with 1-4 objects of 23-56 px, segmentation images 160 px with stuff
regions (wall, sky, floor, each with its own surface) and 1-4 objects.

Usage::

    python tools/dataset_converters/make_demo_data.py [--root data/demo]
        [--tasks cls det seg] [--seed 0] [--force]

The command skips a dataset whose completion marker is already present
(``.complete`` with the generation settings), so it is cheap to call before
every run.
"""
import argparse
import colorsys
import json
import math
import os
import os.path as osp
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------- classes
SHAPES = ('disc', 'square', 'triangle', 'cross', 'star', 'crescent')
TEXTURES = ('dots', 'checks', 'stripes', 'grid', 'speckle', 'waves')

# The 80 COCO categories and their official ids (the json carries all of
# them so a COCO config's class list stays as it is).
COCO_CATEGORIES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv',
    'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave',
    'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase',
    'scissors', 'teddy bear', 'hair drier', 'toothbrush')
COCO_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)
# stand-in COCO category of each shape class
COCO_NAMES = dict(disc='sports ball', square='tv', triangle='pizza',
                  cross='airplane', star='kite', crescent='banana')

# ADE20K: label value (1-based index into the 150 classes) and its name.
# Stuff regions of the background, then the stand-in class of each shape.
ADE_STUFF = dict(wall=(1, 'wall'), sky=(3, 'sky'), floor=(4, 'floor'))
ADE_THINGS = dict(disc=(120, 'ball'), square=(42, 'box'),
                  triangle=(87, 'awning'), cross=(91, 'airplane'),
                  star=(150, 'flag'), crescent=(121, 'food'))

# ----------------------------------------------------------- dataset sizes
SPLITS = dict(
    cls=dict(size=64, train=2400, val=300),
    det=dict(size=128, train=600, val=100),
    seg=dict(size=160, train=400, val=50),
)
VERSION = 5  # bump when the generator's output changes


# ------------------------------------------------------------ primitives
def _random_colour(rng, avoid=None, min_dist=90):
    """A random RGB colour at least ``min_dist`` away from ``avoid``."""
    for _ in range(50):
        c = rng.integers(0, 256, size=3)
        if avoid is None or np.abs(c - avoid).sum() >= min_dist:
            return c.astype(np.float32)
    return (255 - np.asarray(avoid)).astype(np.float32)


def _coords(h, w, angle, cx=0., cy=0.):
    """Rotated pixel coordinates (u, v) about (cx, cy)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x -= cx
    y -= cy
    ca, sa = math.cos(angle), math.sin(angle)
    return x * ca + y * sa, -x * sa + y * ca


def texture(kind, h, w, rng):
    """A {0,1}-valued pattern of the given kind over an h x w canvas."""
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 11)
    u, v = _coords(h, w, angle, rng.uniform(0, 20), rng.uniform(0, 20))
    if kind == 'stripes':
        p = np.sin(2 * math.pi * u / period) > 0
    elif kind == 'checks':
        p = (np.floor(u / period) + np.floor(v / period)) % 2 > 0
    elif kind == 'dots':
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        p = du * du + dv * dv < (0.3 * period) ** 2
    elif kind == 'grid':
        lw = max(1.2, period * 0.18)
        p = np.minimum(u % period, v % period) < lw
    elif kind == 'speckle':
        cell = int(rng.integers(2, 4))
        small = rng.random((h // cell + 2, w // cell + 2)) > 0.5
        p = np.kron(small, np.ones((cell, cell)))[:h, :w] > 0
    elif kind == 'waves':
        amp = period * 0.6
        p = np.sin(2 * math.pi *
                   (u + amp * np.sin(2 * math.pi * v / (2.5 * period)))
                   / period) > 0
    else:
        raise ValueError(kind)
    return p.astype(np.float32)


def paint(canvas, mask, pattern, c1, c2):
    """Fill ``canvas`` where ``mask`` with pattern colours c1 (0) / c2 (1)."""
    fill = c1[None, None] * (1 - pattern[..., None]) + \
        c2[None, None] * pattern[..., None]
    m = mask[..., None]
    canvas[:] = canvas * (1 - m) + fill * m


def shape_polygon(kind, cx, cy, r, angle):
    """Outline of a shape class as a list of (x, y) vertices."""
    if kind == 'disc':
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind in ('square', 'triangle'):
        n = 4 if kind == 'square' else 3
        t = np.arange(n) * 2 * math.pi / n
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == 'cross':
        a = 0.34
        pts = np.array([(a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1),
                        (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
                        (-a, -1)], np.float64)
    elif kind == 'star':
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    elif kind == 'crescent':
        # unit outer circle minus a circle of radius rho centred at (d, 0)
        d, rho = 0.5, 0.8
        x = (1 - rho ** 2 + d ** 2) / (2 * d)
        y = math.sqrt(1 - x * x)
        phi = math.atan2(y, x)
        psi = math.atan2(y, x - d)
        outer = np.linspace(phi, 2 * math.pi - phi, 24)
        inner = np.linspace(2 * math.pi - psi, psi, 16)[1:-1]
        pts = np.concatenate([
            np.stack([np.cos(outer), np.sin(outer)], 1),
            np.stack([d + rho * np.cos(inner), rho * np.sin(inner)], 1)])
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    rot = np.array([[ca, -sa], [sa, ca]])
    pts = pts @ rot.T * r + np.array([cx, cy])
    return [(float(px), float(py)) for px, py in pts]


def polygon_area(polygon):
    """Area enclosed by a simple polygon (shoelace formula)."""
    xy = np.asarray(polygon, np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
                 / 2)


def raster(polygon, h, w):
    img = Image.new('L', (w, h), 0)
    ImageDraw.Draw(img).polygon(polygon, fill=1)
    return np.asarray(img, np.float32)


def _blob_polygon(rng, cx, cy, r):
    """An irregular (jagged or elongated) outline for distractors."""
    if rng.random() < 0.5:
        n = int(rng.integers(7, 12))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = r * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)
    else:  # long thin ellipse
        t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
        a, b, ang = r, r * rng.uniform(0.15, 0.3), rng.uniform(0, math.pi)
        x, y = a * np.cos(t), b * np.sin(t)
        pts = np.stack([cx + x * math.cos(ang) - y * math.sin(ang),
                        cy + x * math.sin(ang) + y * math.cos(ang)], 1)
    return [(float(px), float(py)) for px, py in pts]


def clutter(canvas, rng, n_lines, n_blobs, size_range):
    """Random lines and distractor blobs drawn over ``canvas`` in place."""
    h, w = canvas.shape[:2]
    for _ in range(n_blobs):
        r = rng.uniform(*size_range)
        poly = _blob_polygon(rng, rng.uniform(0, w), rng.uniform(0, h), r)
        m = raster(poly, h, w)
        c1 = _random_colour(rng)
        c2 = _random_colour(rng, c1)
        # a smooth two-colour blend: the class patterns belong to the
        # objects only
        u, _ = _coords(h, w, rng.uniform(0, 2 * math.pi), w / 2, h / 2)
        pat = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
        paint(canvas, m, pat.astype(np.float32), c1, c2)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(n_lines):
        pts = [tuple(rng.uniform(-10, max(h, w) + 10, 2)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in _random_colour(rng)),
                  width=int(rng.integers(1, 4)))
    canvas[:] = np.asarray(img, np.float32)


def background(rng, h, w):
    """Colour gradient + noise."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    u, _ = _coords(h, w, rng.uniform(0, 2 * math.pi), w / 2, h / 2)
    g = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
    return c1 * (1 - g[..., None]) + c2 * g[..., None]


def finish(canvas, rng):
    canvas = canvas + rng.normal(0, rng.uniform(3, 10), canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def class_colour(rng, cls):
    """A colour of the palette of class ``cls``: a hue band of its own
    (+-12 degrees around ``cls`` x 60 degrees), saturated, of any
    brightness. Backgrounds and distractors take any colour, these hues
    included, so a colour alone does not give the class away."""
    hue = (cls / len(SHAPES) + rng.uniform(-1 / 30, 1 / 30)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0),
                              rng.uniform(0.45, 1.0))
    return np.array(rgb, np.float32) * 255


def draw_object(canvas, rng, cls, cx, cy, r):
    """Paint shape class ``cls`` (its outline, its surface pattern in a
    colour of its palette and a random second colour); return its polygon
    and raster mask."""
    h, w = canvas.shape[:2]
    poly = shape_polygon(SHAPES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi))
    mask = raster(poly, h, w)
    c1 = class_colour(rng, cls)
    c2 = _random_colour(rng, c1, min_dist=150)
    paint(canvas, mask, texture(TEXTURES[cls], h, w, rng), c1, c2)
    return poly, mask


def place(rng, n, size, r_range, taken=()):
    """Up to ``n`` non-overlapping circles (cx, cy, r) inside the image."""
    out = list(taken)
    placed = []
    for _ in range(n * 30):
        if len(placed) == n:
            break
        r = rng.uniform(*r_range)
        cx, cy = rng.uniform(r, size - r, 2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2
               for x, y, rr in out):
            out.append((cx, cy, r))
            placed.append((cx, cy, r))
    return placed


# ------------------------------------------------------------ generators
def make_cls(root, split, n, size, rng, tick=lambda i: None):
    lines = []
    per_class = n // len(SHAPES)
    for cls, name in enumerate(SHAPES):
        folder = f'{cls:02d}_{name}'
        os.makedirs(osp.join(root, split, folder), exist_ok=True)
        for i in range(per_class):
            tick(cls * per_class + i)
            canvas = background(rng, size, size)
            f = size / 128
            clutter(canvas, rng, int(rng.integers(4, 12) * f),
                    int(rng.integers(2, 5)), (8 * f, 24 * f))
            r = rng.uniform(0.26, 0.42) * size
            cx, cy = rng.uniform(r, size - r, 2)
            draw_object(canvas, rng, cls, cx, cy, r)
            clutter(canvas, rng, int(rng.integers(0, 4)), 0, (0, 1))
            rel = f'{folder}/{split}_{cls:02d}_{i:05d}.JPEG'
            Image.fromarray(finish(canvas, rng)).save(
                osp.join(root, split, rel), quality=92)
            lines.append(f'{rel} {cls}')
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def make_det(root, split, n, size, rng, tick=lambda i: None):
    img_dir = osp.join(root, f'{split}2017')
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    name2id = dict(zip(COCO_CATEGORIES, COCO_IDS))
    images, anns = [], []
    for i in range(n):
        tick(i)
        canvas = background(rng, size, size)
        clutter(canvas, rng, int(rng.integers(6, 16)),
                int(rng.integers(3, 7)), (8, 30))
        img_id = i + 1
        for cx, cy, r in place(rng, int(rng.integers(1, 5)), size,
                               (0.09 * size, 0.22 * size)):
            cls = int(rng.integers(len(SHAPES)))
            poly, mask = draw_object(canvas, rng, cls, cx, cy, r)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            x0, y0 = float(xs.min()), float(ys.min())
            x1, y1 = float(xs.max() + 1), float(ys.max() + 1)
            anns.append(dict(
                id=len(anns) + 1, image_id=img_id,
                category_id=name2id[COCO_NAMES[SHAPES[cls]]],
                bbox=[x0, y0, x1 - x0, y1 - y0], area=polygon_area(poly),
                iscrowd=0,
                segmentation=[[round(c, 2) for pt in poly for c in pt]]))
        clutter(canvas, rng, int(rng.integers(0, 3)), 0, (0, 1))
        file_name = f'{img_id:012d}.jpg'
        Image.fromarray(finish(canvas, rng)).save(
            osp.join(img_dir, file_name), quality=92)
        images.append(dict(id=img_id, file_name=file_name, height=size,
                           width=size))
    cats = [dict(id=i, name=nm, supercategory='demo')
            for nm, i in zip(COCO_CATEGORIES, COCO_IDS)]
    info = dict(description='mmbiformer built-in demo data (synthetic)',
                version=str(VERSION))
    with open(osp.join(root, 'annotations',
                       f'instances_{split}2017.json'), 'w') as f:
        json.dump(dict(info=info, images=images, annotations=anns,
                       categories=cats, licenses=[]), f)


def _stuff_pattern(kind, h, w, rng):
    """Surface pattern of a stuff class, in [0, 1]."""
    if kind == 'sky':  # smooth vertical gradient with faint clouds
        y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
        low = rng.random((h // 16 + 2, w // 16 + 2)).astype(np.float32)
        clouds = np.asarray(Image.fromarray((low * 255).astype(np.uint8))
                            .resize((w, h), Image.BILINEAR), np.float32)
        return np.clip(0.7 * y + 0.3 * clouds / 255, 0, 1) * \
            np.ones((1, w), np.float32)
    if kind == 'wall':  # bricks
        bh = rng.uniform(7, 11)
        bw = bh * rng.uniform(1.8, 2.6)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bw / 2
        mortar = ((y % bh) < 1.5) | ((xs % bw) < 1.5)
        return mortar.astype(np.float32)
    if kind == 'floor':  # planks with per-plank shade and grain
        ph = rng.uniform(9, 15)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        shade = rng.random(int(h / ph) + 2)[np.floor(y / ph).astype(int)]
        grain = 0.15 * np.sin(x / rng.uniform(1.5, 3) + y * 0.3)
        return np.clip(0.6 * shade + grain + 0.2, 0, 1)
    raise ValueError(kind)


def make_seg(root, split, n, size, rng, tick=lambda i: None):
    tag = 'training' if split == 'train' else 'validation'
    img_dir = osp.join(root, 'images', tag)
    ann_dir = osp.join(root, 'annotations', tag)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    stuff = list(ADE_STUFF)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        tick(i)
        canvas = np.zeros((size, size, 3), np.float32)
        label = np.zeros((size, size), np.uint8)
        # two or three stuff regions split by wavy, tilted boundaries
        order = rng.permutation(len(stuff))[:int(rng.integers(2, 4))]
        cuts = np.sort(rng.uniform(0.25, 0.75, len(order) - 1)) * size
        tilt = rng.uniform(-0.4, 0.4)
        wave = rng.uniform(2, 8) * np.sin(x / rng.uniform(8, 20))
        level = y + tilt * (x - size / 2) + wave
        region = np.searchsorted(cuts, level)
        for k, s in enumerate(order):
            m = (region == k).astype(np.float32)
            c1 = _random_colour(rng)
            c2 = _random_colour(rng, c1, min_dist=120)
            pat = _stuff_pattern(stuff[s], size, size, rng)
            paint(canvas, m, pat, c1, c2)
            label[m > 0] = ADE_STUFF[stuff[s]][0]
        clutter(canvas, rng, int(rng.integers(3, 10)),
                int(rng.integers(2, 6)), (6, 24))
        for cx, cy, r in place(rng, int(rng.integers(1, 5)), size,
                               (0.08 * size, 0.2 * size)):
            cls = int(rng.integers(len(SHAPES)))
            _, mask = draw_object(canvas, rng, cls, cx, cy, r)
            label[mask > 0] = ADE_THINGS[SHAPES[cls]][0]
        stem = f'ADE_{tag[:5]}_{i + 1:08d}' if tag == 'training' else \
            f'ADE_val_{i + 1:08d}'
        Image.fromarray(finish(canvas, rng)).save(
            osp.join(img_dir, stem + '.jpg'), quality=92)
        Image.fromarray(label, mode='L').save(osp.join(ann_dir, stem + '.png'))


class _Progress:
    """Progress of one split: a bar that redraws itself on a terminal,
    else a line at every quarter."""

    def __init__(self, name, total, log):
        self.name, self.total, self.log = name, max(1, total), log
        self.tty = log is print and sys.stdout.isatty()
        self.shown = -1
        self.t0 = time.time()

    def __call__(self, i):
        done = i + 1
        if self.tty:
            if done == self.total or time.time() - self.t0 > 0.5:
                n = 30 * done // self.total
                sys.stdout.write(f'\r[demo data] {self.name:<10} '
                                 f'[{"#" * n}{"." * (30 - n)}] '
                                 f'{done}/{self.total}')
                if done == self.total:
                    sys.stdout.write('\r' + ' ' * 70 + '\r')
                sys.stdout.flush()
            return
        quarter = 4 * done // self.total
        # only for a split that takes a while (no noise for quick ones)
        if quarter > self.shown and quarter in (1, 2, 3) and \
                self.log is print and time.time() - self.t0 > 2:
            self.shown = quarter
            self.log(f'[demo data] {self.name}: {done}/{self.total} images')


TASKS = dict(
    cls=('imagenet', make_cls),
    det=('coco', make_det),
    seg=(osp.join('ade', 'ADEChallengeData2016'), make_seg),
)


def dataset_dir(root, task):
    return osp.join(root, TASKS[task][0])


def make(root='data/demo', tasks=('cls', 'det', 'seg'), seed=0,
         force=False, scale=1.0, log=print):
    """Generate the requested datasets (skipping complete ones).

    Returns a dict task -> dataset directory.
    """
    out = {}
    for task in tasks:
        sub, fn = TASKS[task]
        path = osp.join(root, sub)
        spec = dict(SPLITS[task])
        spec['train'] = max(len(SHAPES), int(spec['train'] * scale))
        spec['val'] = max(len(SHAPES), int(spec['val'] * scale))
        stamp = json.dumps(dict(version=VERSION, seed=seed, **spec),
                           sort_keys=True)
        marker = osp.join(path, '.complete')
        out[task] = path
        if not force and osp.exists(marker):
            with open(marker) as f:
                if f.read() == stamp:
                    log(f'[demo data] {task}: {path} is up to date')
                    continue
        if osp.exists(path):
            shutil.rmtree(path)
        t0 = time.time()
        for k, split in enumerate(('train', 'val')):
            # an independent stream per (task, split): the two splits never
            # share an image and a split does not depend on the other's size
            rng = np.random.default_rng(
                [seed, list(TASKS).index(task), k])
            fn(path, split, spec[split], spec['size'], rng,
               _Progress(f'{task} {split}', spec[split], log))
        with open(marker, 'w') as f:
            f.write(stamp)
        log(f'[demo data] {task}: wrote {spec["train"]} train / '
            f'{spec["val"]} val images to {path} '
            f'({time.time() - t0:.1f}s)')
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--root', default='data/demo',
                   help='output root (default: data/demo)')
    p.add_argument('--tasks', nargs='+', default=['cls', 'det', 'seg'],
                   choices=list(TASKS))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--scale', type=float, default=1.0,
                   help='multiply the number of images per split')
    p.add_argument('--force', action='store_true',
                   help='regenerate even if the data is up to date')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    make(args.root, args.tasks, args.seed, args.force, args.scale)
    return 0


if __name__ == '__main__':
    sys.exit(main())
