"""The built-in data: formats the toolboxes read, content, determinism."""
import json
import os
import os.path as osp

import numpy as np
import pytest
from conftest import make_demo_data
from PIL import Image


def test_coco_instances(demo_root):
    from mmdet.datasets import CocoDataset
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    root = osp.join(demo_root, 'coco')
    for split in ('train', 'val'):
        coco = COCO(osp.join(root, 'annotations',
                             f'instances_{split}2017.json'))
        cats = coco.loadCats(coco.getCatIds())
        # the 80 COCO categories under their official ids
        assert [c['name'] for c in cats] == \
            list(CocoDataset.METAINFO['classes'])
        assert coco.getCatIds()[-1] == 90
        used = {a['category_id'] for a in coco.dataset['annotations']}
        assert 2 <= len(used) <= len(make_demo_data.SHAPES)
        for img in coco.dataset['images']:
            assert osp.exists(osp.join(root, f'{split}2017',
                                       img['file_name']))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
            assert 1 <= len(anns) <= 4
            for a in anns:
                x, y, w, h = a['bbox']
                assert 0 <= x and 0 <= y and w > 4 and h > 4
                assert x + w <= img['width'] and y + h <= img['height']
                # one polygon whose mask fills its box plausibly and whose
                # area matches the stored one
                (poly, ) = a['segmentation']
                assert len(poly) % 2 == 0 and len(poly) >= 6
                m = coco.annToMask(a)
                ys, xs = np.nonzero(m)
                # (rasterisers differ by a pixel or two at sharp tips)
                assert abs(xs.min() - x) <= 3 and abs(ys.min() - y) <= 3
                assert 0.2 < m.sum() / (w * h) <= 1.0
                rle = mask_utils.frPyObjects([poly], img['height'],
                                             img['width'])
                assert mask_utils.area(rle)[0] == pytest.approx(
                    a['area'], rel=0.15)


def test_ade_layout(demo_root):
    from mmseg.datasets import ADE20KDataset

    classes = ADE20KDataset.METAINFO['classes']
    root = osp.join(demo_root, 'ade', 'ADEChallengeData2016')
    names = dict(make_demo_data.ADE_STUFF, **make_demo_data.ADE_THINGS)
    for value, name in names.values():
        assert classes[value - 1] == name  # 1-based label of that class
    allowed = {0} | {v for v, _ in names.values()}
    seen = set()
    for split in ('training', 'validation'):
        imgs = sorted(os.listdir(osp.join(root, 'images', split)))
        anns = sorted(os.listdir(osp.join(root, 'annotations', split)))
        assert imgs and [i[:-4] for i in imgs] == [a[:-4] for a in anns]
        for a in anns[:5]:
            lab = Image.open(osp.join(root, 'annotations', split, a))
            assert lab.mode == 'L'
            arr = np.asarray(lab)
            img = Image.open(osp.join(root, 'images', split,
                                      a[:-4] + '.jpg'))
            assert img.size == lab.size
            assert set(np.unique(arr)) <= allowed
            seen |= set(np.unique(arr).tolist())
    # stuff and objects both present
    assert seen & {1, 3, 4} and seen - {0, 1, 3, 4}


def test_imagenet_layout(demo_root):
    root = osp.join(demo_root, 'imagenet')
    for split in ('train', 'val'):
        with open(osp.join(root, 'meta', f'{split}.txt')) as f:
            lines = [ln.split() for ln in f.read().splitlines()]
        labels = [int(lab) for _, lab in lines]
        assert sorted(set(labels)) == list(range(len(make_demo_data.SHAPES)))
        folders = sorted(os.listdir(osp.join(root, split)))
        assert len(folders) == len(make_demo_data.SHAPES)
        for path, lab in lines:
            # folder order = label order, so the tree alone is consistent
            assert folders.index(path.split('/')[0]) == int(lab)
            assert osp.exists(osp.join(root, split, path))


def test_deterministic_and_skips_up_to_date(tmp_path):
    a = make_demo_data.make(str(tmp_path / 'a'), tasks=['seg'], scale=0.03,
                            log=lambda *x: None)['seg']
    b = make_demo_data.make(str(tmp_path / 'b'), tasks=['seg'], scale=0.03,
                            log=lambda *x: None)['seg']
    rel = osp.join('annotations', 'training')
    f = sorted(os.listdir(osp.join(a, rel)))[0]
    with open(osp.join(a, rel, f), 'rb') as fa, \
            open(osp.join(b, rel, f), 'rb') as fb:
        assert fa.read() == fb.read()
    logs = []
    make_demo_data.make(str(tmp_path / 'a'), tasks=['seg'], scale=0.03,
                        log=logs.append)
    assert 'up to date' in logs[0]
    # another seed gives other data
    c = make_demo_data.make(str(tmp_path / 'c'), tasks=['seg'], scale=0.03,
                            seed=1, log=lambda *x: None)['seg']
    with open(osp.join(a, rel, f), 'rb') as fa, \
            open(osp.join(c, rel, f), 'rb') as fc:
        assert fa.read() != fc.read()


def test_classes_differ_in_shape_and_texture():
    rng = np.random.default_rng(0)
    masks = [make_demo_data.raster(
        make_demo_data.shape_polygon(s, 32, 32, 25, 0.3), 64, 64)
        for s in make_demo_data.SHAPES]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            iou = (masks[i] * masks[j]).sum() / np.maximum(
                masks[i], masks[j]).sum()
            assert iou < 0.9, (make_demo_data.SHAPES[i],
                               make_demo_data.SHAPES[j])
    pats = [make_demo_data.texture(t, 64, 64, rng)
            for t in make_demo_data.TEXTURES]
    for p in pats:
        assert 0.05 < p.mean() < 0.95  # two colours, not a flat fill
    assert len({p.tobytes() for p in pats}) == len(pats)


def test_cli_writes_marker(tmp_path):
    assert make_demo_data.main(['--root', str(tmp_path), '--tasks', 'cls',
                                '--scale', '0.02']) == 0
    with open(tmp_path / 'imagenet' / '.complete') as f:
        stamp = json.load(f)
    assert stamp['seed'] == 0 and stamp['train'] >= 6
