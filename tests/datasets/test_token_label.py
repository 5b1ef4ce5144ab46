"""Token-label maps: the released file format, errors that name the image,
and alignment with the augmented image (crop box order, flip, RoI-align)."""
import os
import os.path as osp
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmbiformer  # noqa: F401  (registers the transforms)
from mmbiformer.datasets import (
                                 LoadTokenLabel,
                                 ResampleTokenLabel,
                                 TokenLabelFileError,
                                 TokenLabelRandomFlip,
                                 TokenLabelRandomResizedCrop,
                                 align_label_map,
                                 load_token_label,
                                 token_label_path,
)


def coordinate_map(h, w, k=5):
    """A (2, k, H, W) label map whose location (r, c) encodes its own
    coordinates: class 0 has the logit x = (c + 0.5) / W, class 1 the
    logit y = (r + 0.5) / H (the centre of the cell in fractions of the
    map), classes 2.. logit 0."""
    ys, xs = torch.meshgrid((torch.arange(h) + .5) / h,
                            (torch.arange(w) + .5) / w, indexing='ij')
    values = torch.zeros(k, h, w)
    values[0], values[1] = xs, ys
    index = torch.arange(k, dtype=torch.float32)[:, None, None].expand(
        k, h, w)
    return torch.stack([values, index])


def expected_xy(box, out_h, out_w):
    """Centres of the out_h x out_w cells of box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    xs = x1 + (torch.arange(out_w) + .5) * (x2 - x1) / out_w
    ys = y1 + (torch.arange(out_h) + .5) * (y2 - y1) / out_h
    return xs[None, :].expand(out_h, out_w), ys[:, None].expand(out_h, out_w)


def write_label(root, wnid, stem, tensor):
    os.makedirs(osp.join(root, wnid), exist_ok=True)
    path = osp.join(root, wnid, stem + '.pt')
    torch.save(tensor, path)
    return path


def test_reads_the_released_format(tmp_path):
    """[2, 5, H, W] float16 at <root>/<wnid>/<stem>.pt, read unchanged."""
    logits = torch.randn(5, 18, 18).sort(0, descending=True).values
    index = torch.randint(0, 1000, (5, 18, 18)).float()
    released = torch.stack([logits, index]).half()
    write_label(str(tmp_path), 'n01440764', 'n01440764_10026', released)
    img = '/data/imagenet/train/n01440764/n01440764_10026.JPEG'
    assert token_label_path(img, str(tmp_path)) == osp.join(
        str(tmp_path), 'n01440764', 'n01440764_10026.pt')
    out = LoadTokenLabel(str(tmp_path), num_classes=1000, topk=5)(
        dict(img_path=img))
    assert out['token_label'].dtype == torch.float32
    assert torch.equal(out['token_label'], released.float())
    assert list(out['token_label_box']) == [0, 0, 1, 1]


def test_missing_file_names_the_image(tmp_path):
    img = 'train/n01440764/n01440764_1.JPEG'
    with pytest.raises(FileNotFoundError, match='n01440764_1.JPEG'):
        LoadTokenLabel(str(tmp_path))(dict(img_path=img))


@pytest.mark.parametrize('bad, what', [
    (torch.zeros(5, 18, 18, dtype=torch.float16), r'shape \[5, 18, 18\]'),
    (torch.zeros(2, 3, 18, 18, dtype=torch.float16), r'expected \[2, 5'),
    (torch.zeros(3, 5, 18, 18, dtype=torch.float16), 'shape'),
    (torch.zeros(2, 5, 18, 18, dtype=torch.int64), 'int64'),
    (dict(a=1), 'dict'),
])
def test_wrong_file_names_the_image(tmp_path, bad, what):
    write_label(str(tmp_path), 'n1', 'img_7', bad)
    with pytest.raises(TokenLabelFileError, match='img_7.JPEG') as err:
        LoadTokenLabel(str(tmp_path), topk=5)(
            dict(img_path='x/n1/img_7.JPEG'))
    assert re.search(what, str(err.value)), str(err.value)


def test_class_index_out_of_range(tmp_path):
    label = coordinate_map(4, 4)
    label[1, 0, 0, 0] = 1000
    path = write_label(str(tmp_path), 'n1', 'a', label.half())
    with pytest.raises(TokenLabelFileError, match='a.png'):
        load_token_label(path, 'n1/a.png', num_classes=1000)


def test_roi_align_box_is_x_then_y():
    """A non-square box of the coordinate map gives each token its own
    cell centre: x from columns, y from rows (no transposition)."""
    label = coordinate_map(18, 18)
    box = (0.25, 0.1, 0.75, 0.9)  # inside the half-cell border
    out = align_label_map(label, box, (7, 7), num_classes=5)
    xs, ys = expected_xy(box, 7, 7)
    assert torch.allclose(out[0], xs, atol=1e-5)
    assert torch.allclose(out[1], ys, atol=1e-5)
    assert torch.all(out[2:] == 0)
    # a non-square grid too
    out = align_label_map(label, box, (3, 5), num_classes=5)
    xs, ys = expected_xy(box, 3, 5)
    assert torch.allclose(out[0], xs, atol=1e-5)
    assert torch.allclose(out[1], ys, atol=1e-5)


class FixedCrop(TokenLabelRandomResizedCrop):
    """A crop with known parameters (top, left, height, width)."""

    def __init__(self, params, **kwargs):
        super().__init__(**kwargs)
        self.params = params

    def rand_crop_params(self, img):
        return self.params


def coordinate_image(h, w):
    """Float image whose pixel (r, c) holds x = (c + .5) / W in channel 0
    and y = (r + .5) / H in channel 1."""
    ys, xs = np.meshgrid((np.arange(h) + .5) / h, (np.arange(w) + .5) / w,
                         indexing='ij')
    return np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.float32)


def token_means(img, grid):
    """(2, grid, grid) channel means of the image over the token cells."""
    t = torch.from_numpy(img[..., :2].copy()).permute(2, 0, 1)[None]
    return F.adaptive_avg_pool2d(t, grid)[0]


@pytest.mark.parametrize('flip', [False, True])
def test_aligned_map_matches_the_image_crop(flip):
    """Crop (known, not square, off-centre) then flip a coordinate image
    and its coordinate label map: every token's label logits hold the
    coordinates the image shows at that token."""
    h, w = 180, 240  # not square, and the map is 18x18 (as released)
    results = dict(img=coordinate_image(h, w), img_shape=(h, w),
                   token_label=coordinate_map(18, 18),
                   token_label_box=np.array([0., 0., 1., 1.]))
    top, left, ch, cw = 30, 100, 112, 84
    results = FixedCrop((top, left, ch, cw), scale=224,
                        interpolation='bilinear')(results)
    assert results['img'].shape[:2] == (224, 224)
    assert np.allclose(results['token_label_box'],
                       [left / w, top / h, (left + cw) / w, (top + ch) / h])
    if flip:
        results = TokenLabelRandomFlip(prob=1., direction='horizontal')(
            results)
    image_xy = token_means(results['img'], 7)
    logits = align_label_map(results['token_label'],
                             results['token_label_box'], 7, num_classes=5)
    # the map's cells are 1/18 of the image: allow a fraction of one
    assert torch.allclose(logits[:2], image_xy, atol=0.01), (
        logits[:2] - image_xy).abs().max()
    # and the x coordinate decreases along the row after the flip
    assert (logits[0, 0, 0] > logits[0, 0, -1]) == flip
    # the same, through the transform that writes the targets
    out = ResampleTokenLabel(num_classes=5, output_size=7)(results)
    assert 'token_label' not in out
    assert torch.allclose(out['gt_token_label'], logits.softmax(0),
                          atol=1e-6)
    # the crop's label: the same region, flipped or not
    crop = align_label_map(coordinate_map(18, 18),
                           [left / w, top / h, (left + cw) / w,
                            (top + ch) / h], 1, 5).flatten()
    assert torch.allclose(out['gt_score'], crop.softmax(0), atol=1e-6)


def test_vertical_flip_and_composed_crops():
    label = coordinate_map(16, 16)
    results = dict(img=coordinate_image(64, 64), img_shape=(64, 64),
                   token_label=label, token_label_box=np.array([0., 0., 1,
                                                                1]))
    results = FixedCrop((8, 16, 48, 32), scale=32)(results)
    results = FixedCrop((0, 8, 16, 16), scale=16)(results)
    # the first crop shows x 0.25..0.75, y 0.125..0.875 of the map; the
    # second columns 8..24 and rows 0..16 of that 32x32 view
    assert np.allclose(results['token_label_box'],
                       [0.375, 0.125, 0.625, 0.5])
    results = TokenLabelRandomFlip(prob=1., direction='vertical')(results)
    logits = align_label_map(results['token_label'],
                             results['token_label_box'], 2, num_classes=5)
    assert torch.allclose(logits[:2], token_means(results['img'], 2),
                          atol=0.02)
    assert logits[1, 0, 0] > logits[1, -1, 0]  # y decreases downwards


def test_pipeline_packs_the_targets(tmp_path):
    """The config's transforms through mmpretrain's registry and
    PackInputs(algorithm_keys=['gt_token_label'])."""
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope
    from PIL import Image
    init_default_scope('mmpretrain')
    img_dir = tmp_path / 'train' / 'n7'
    img_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img_dir / 'a.png')
    write_label(str(tmp_path / 'labels'), 'n7', 'a',
                coordinate_map(6, 6).half())
    pipeline = Compose([
        dict(type='LoadImageFromFile'),
        dict(type='LoadTokenLabel', label_root=str(tmp_path / 'labels'),
             num_classes=10, topk=5),
        dict(type='TokenLabelRandomResizedCrop', scale=64),
        dict(type='TokenLabelRandomFlip', prob=0.5),
        dict(type='ResampleTokenLabel', num_classes=10, output_size=2),
        dict(type='PackInputs', algorithm_keys=['gt_token_label']),
    ])
    packed = pipeline(dict(img_path=str(img_dir / 'a.png'), gt_label=3))
    sample = packed['data_samples']
    assert packed['inputs'].shape == (3, 64, 64)
    assert sample.gt_token_label.shape == (10, 2, 2)
    assert torch.allclose(sample.gt_token_label.sum(0), torch.ones(2, 2))
    assert sample.gt_score.shape == (10, )
    assert int(sample.gt_label) == 3



def test_token_label_configs_keep_the_photometric_policies():
    """The configs write the RandAugment policies out (as mm configs do);
    they are the package's list, without the geometric operations."""
    from mmengine.config import Config

    from mmbiformer.datasets import PHOTOMETRIC_RANDAUG_POLICIES
    root = osp.join(osp.dirname(__file__), '..', '..', 'configs',
                    'classification')
    for name in ('biformer_s_tl_in1k.py', 'biformer_b_tl_in1k.py'):
        cfg = Config.fromfile(osp.join(root, name))
        ra = [t for t in cfg.train_dataloader.dataset.pipeline
              if t['type'] == 'RandAugment']
        assert len(ra) == 1, name
        assert ra[0]['policies'] == PHOTOMETRIC_RANDAUG_POLICIES, name


def test_label_map_summary_by_hand(tmp_path):
    """summarize_token_labels on two hand-made maps (3 classes, top-2, a
    1x2 grid): entropy of the scattered softmax, agreement of the maps'
    top-1 with the image's folder."""
    from mmbiformer.apis.token_labels import (
                                              format_label_summary,
                                              summarize_token_labels,
    )
    labels = tmp_path / 'labels'
    for wnid in ('a', 'b'):
        (tmp_path / 'train' / wnid).mkdir(parents=True)
        (tmp_path / 'train' / wnid / f'{wnid}_0.JPEG').write_bytes(b'')
    # image of class 0: location 0 says class 0 (logits 4, 1 for classes
    # 0, 1), location 1 class 2 (3, 2 for classes 2, 0)
    write_label(str(labels), 'a', 'a_0', torch.tensor(
        [[[[4., 3.]], [[1., 2.]]], [[[0., 2.]], [[1., 0.]]]]).half())
    # image of class 1: both locations class 1 (logits 5, 0 for 1, 0)
    write_label(str(labels), 'b', 'b_0', torch.tensor(
        [[[[5., 5.]], [[0., 0.]]], [[[1., 1.]], [[0., 0.]]]]).half())
    stats = summarize_token_labels(str(tmp_path / 'train'), str(labels),
                                   num_classes=3)
    targets = [torch.tensor(t).softmax(0) for t in
               ([4., 1., 0.], [2., 0., 3.], [0., 5., 0.], [0., 5., 0.])]
    entropy = sum(float(-(p * p.log()).sum()) for p in targets) / 4
    assert stats['files'] == 2 and stats['grid'] == (1, 2)
    assert stats['topk'] == 2
    assert stats['entropy'] == pytest.approx(entropy, rel=1e-4)
    assert stats['max_entropy'] == pytest.approx(np.log(3))
    assert stats['max_prob'] == pytest.approx(
        sum(float(p.max()) for p in targets) / 4, rel=1e-4)
    assert stats['token_top1'] == pytest.approx(75.)
    # whole-map logits of image a: (3, 0.5, 1.5): class 0, right
    assert stats['image_top1'] == pytest.approx(100.)
    line = format_label_summary(stats)
    assert line.startswith('label maps: 2 files, 1x2') and '75.0 %' in line


def _demo_tool():
    import importlib.util
    path = osp.join(osp.dirname(osp.dirname(osp.dirname(
        osp.abspath(__file__)))), 'tools', 'token_label_demo.py')
    spec = importlib.util.spec_from_file_location('token_label_demo', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_configs_use_the_data_classes(tmp_path):
    """make token-label-demo: the teacher, the label maps and both
    students predict the built-in data's classes (not ImageNet's 1000,
    which would make every token target nearly uniform), the students
    share one schedule, and the real configs keep 1000 classes."""
    from mmengine.config import Config
    demo = _demo_tool()
    data = tmp_path / 'imagenet'
    names = ['00_disc', '01_square', '02_triangle']
    (data / 'meta').mkdir(parents=True)
    lines = []
    for i, name in enumerate(names):
        (data / 'train' / name).mkdir(parents=True)
        lines += [f'{name}/train_{i}_{j}.JPEG {i}' for j in range(10)]
    (data / 'meta' / 'train.txt').write_text('\n'.join(lines) + '\n')
    paths = demo.write_configs(str(tmp_path / 'work'), str(data))
    cfgs = {k: Config.fromfile(v) for k, v in paths.items()}
    student = demo.SCHEDULE['student']
    for name, cfg in cfgs.items():
        assert cfg.model.head.num_classes == 3, name
        assert cfg.data_preprocessor.num_classes == 3, name
        assert cfg.train_dataloader.dataset.metainfo.classes == (
            'disc', 'square', 'triangle')
        # 30 images of batch 32: one iteration an epoch
        assert cfg.param_scheduler[1].end == cfg.train_cfg.max_epochs
    tl = cfgs['student_tl'].train_dataloader.dataset.pipeline
    by_type = {t.type: t for t in tl}
    assert by_type['LoadTokenLabel'].num_classes == 3
    assert by_type['LoadTokenLabel'].label_root == str(
        tmp_path / 'work' / 'labels')
    assert by_type['ResampleTokenLabel'].num_classes == 3
    assert by_type['ResampleTokenLabel'].output_size == \
        student['img_size'] // 32
    assert 'RandAugment' not in by_type
    plain, tl_cfg = cfgs['student_plain'], cfgs['student_tl']
    assert plain.train_cfg == tl_cfg.train_cfg
    assert plain.param_scheduler == tl_cfg.param_scheduler
    assert plain.optim_wrapper.optimizer == tl_cfg.optim_wrapper.optimizer
    assert plain.model.backbone == tl_cfg.model.backbone
    crop = [t for t in plain.train_dataloader.dataset.pipeline
            if t.type == 'RandomResizedCrop'][0]
    assert crop.scale == by_type['TokenLabelRandomResizedCrop'].scale
    assert crop.crop_ratio_range == \
        by_type['TokenLabelRandomResizedCrop'].crop_ratio_range
    # the real ImageNet configs are untouched
    real = Config.fromfile(osp.join(osp.dirname(demo.__file__), '..',
                                    'configs', 'classification',
                                    'biformer_s_tl_in1k.py'))
    assert real.model.head.num_classes == 1000
    assert real.train_dataloader.dataset.pipeline[1].num_classes == 1000
