"""The 11 configs load, state the official recipes and build their models."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '*', '*.py')))
DIMS = dict(tiny=[64, 128, 256, 512], small=[64, 128, 256, 512],
            base=[96, 192, 384, 768])


def load(name):
    return Config.fromfile(osp.join(REPO, name))


def test_the_eleven_configs_exist():
    names = {osp.basename(p) for p in CONFIGS}
    expected = {f'biformer_{s}_in1k.py' for s in 'tsb'} | {
        f'biformer_{s}_tl_in1k.py' for s in 'sb'} | {
        f'{m}_biformer_{s}_{d}.py'
        for m, d in (('maskrcnn', 'coco'), ('retinanet', 'coco'),
                     ('upernet', 'ade20k'), ('semfpn', 'ade20k'))
        for s in 'sb'} | {
        'biformer_stl_in1k.py', 'biformer_stl_nchw_in1k.py',
        'imagenet-v2_biformer_s.py', 'imagenet-c_biformer_s.py'}
    assert names == expected


@pytest.mark.parametrize('name', CONFIGS)
def test_common(name):
    cfg = load(name)
    assert cfg.custom_imports == dict(imports=['mmbiformer'],
                                      allow_failed_imports=False)
    bb = cfg.model.backbone
    assert bb.type == 'BiFormer'
    base = osp.basename(name)
    size = base.split('_')[-2] if 'in1k' not in name else base.split('_')[1]
    if 'robustness' in name:  # imagenet-{v2,c}_biformer_<size>.py
        size = base[:-3].split('_')[-1]
    arch = dict(t='tiny', s='small', b='base', stl='stl')[size]
    if 'stl_nchw' in base:
        arch = 'stl_nchw'
    assert bb.arch == arch
    if 'robustness' in name:
        assert cfg.default_scope == 'mmpretrain'
        assert cfg.test_dataloader.dataset.type in ('ImageNetV2',
                                                    'ImageNetC')
        assert '_delete_' not in cfg.test_dataloader.dataset
    elif 'in1k' not in name:
        # dense prediction: ImageNet weights through init_cfg, 4 outputs
        assert bb.init_cfg.type == 'Pretrained'
        # the official ImageNet weights by URL (converted on load)
        from mmbiformer.model_zoo import OFFICIAL_WEIGHTS
        assert bb.init_cfg.checkpoint == \
            OFFICIAL_WEIGHTS[f'biformer_{size}_in1k']
        assert tuple(bb.out_indices) == (0, 1, 2, 3)
        assert bb.auto_pad is True
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        assert cfg.optim_wrapper.optimizer.type == 'AdamW'
        # the BiFormer stages feed the neck / head
        if 'neck' in cfg.model and 'in_channels' in cfg.model.neck:
            assert list(cfg.model.neck.in_channels) == DIMS[arch]
        else:
            assert list(cfg.model.decode_head.in_channels) == DIMS[arch]
            assert cfg.model.auxiliary_head.in_channels == DIMS[arch][2]
        assert cfg.model.get('pretrained') is None


@pytest.mark.parametrize('size,dpr', [('t', 0.1), ('s', 0.15), ('b', 0.4)])
def test_classification_recipe(size, dpr):
    cfg = load(f'configs/classification/biformer_{size}_in1k.py')
    assert cfg.default_scope == 'mmpretrain'
    assert cfg.model.backbone.n_win == 7
    assert cfg.model.backbone.drop_path_rate == dpr
    assert cfg.model.head.in_channels == DIMS[cfg.model.backbone.arch][-1]
    assert cfg.model.head.loss.label_smooth_val == 0.1
    aug = {a.type: a.alpha for a in cfg.model.train_cfg.augments}
    assert aug == dict(Mixup=0.8, CutMix=1.0)
    # 8 GPUs x 128, lr 5e-4 per 512 images -> 1e-3, linear scaling
    assert cfg.train_dataloader.batch_size == 128
    assert cfg.auto_scale_lr.base_batch_size == 1024
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-3, 0.05)
    warm, cos = cfg.param_scheduler
    assert warm.type == 'LinearLR' and warm.end == 5
    assert warm.start_factor * opt.lr == pytest.approx(1e-6)
    assert (cos.type, cos.eta_min, cos.begin, cos.end) == \
        ('CosineAnnealingLR', 1e-5, 5, 300)
    assert cfg.train_cfg.max_epochs == 300
    tr = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert tr['RandomResizedCrop'].interpolation == 'bicubic'
    ra = tr['RandAugment']
    assert (ra.policies, ra.num_policies, ra.magnitude_level,
            ra.magnitude_std) == ('timm_increasing', 2, 9, 0.5)
    assert tr['RandomErasing'].erase_prob == 0.25
    assert cfg.train_dataloader.sampler.type == 'RepeatAugSampler'
    (ema, ) = cfg.custom_hooks
    assert ema.type == 'EMAHook'
    assert 1 - ema.momentum == pytest.approx(0.99996)
    if size == 'b':
        text = open(osp.join(REPO, 'configs', 'classification',
                             'biformer_b_in1k.py')).read()
        assert 'UNCONFIRMED' in text


@pytest.mark.parametrize('model', ['maskrcnn', 'retinanet'])
@pytest.mark.parametrize('size,dpr', [('s', 0.2), ('b', 0.3)])
def test_detection_recipe(model, size, dpr):
    cfg = load(f'configs/detection/{model}_biformer_{size}_coco.py')
    assert cfg.default_scope == 'mmdet'
    bb = cfg.model.backbone
    assert (bb.n_win, bb.drop_path_rate) == (16, dpr)
    assert cfg.train_cfg.max_epochs == 12
    (warm, step) = cfg.param_scheduler
    assert list(step.milestones) == [8, 11]
    assert cfg.train_dataloader.batch_size == 2
    opt = cfg.optim_wrapper.optimizer
    assert opt.lr == 1e-4
    assert 'momentum' not in opt  # SGD settings of the base are gone
    if model == 'maskrcnn':
        assert cfg.model.type == 'MaskRCNN'
        assert opt.weight_decay == 0.05
        assert tuple(opt.betas) == (0.9, 0.999)
        assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
    else:
        assert cfg.model.type == 'RetinaNet'
        assert opt.weight_decay == 1e-4
        assert cfg.optim_wrapper.loss_scale == 512
        assert cfg.model.neck.start_level == 1
        assert cfg.model.neck.add_extra_convs == 'on_input'


@pytest.mark.parametrize('size,dpr', [('s', 0.3), ('b', 0.4)])
def test_upernet_recipe(size, dpr):
    cfg = load(f'configs/segmentation/upernet_biformer_{size}_ade20k.py')
    assert cfg.default_scope == 'mmseg'
    bb = cfg.model.backbone
    assert (bb.n_win, bb.drop_path_rate) == (8, dpr)
    assert cfg.model.decode_head.num_classes == 150
    assert tuple(cfg.crop_size) == (512, 512)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2
    opt = cfg.optim_wrapper.optimizer
    assert (opt.lr, opt.weight_decay) == (6e-5, 0.01)
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0
    warm, poly = cfg.param_scheduler
    assert (warm.start_factor, warm.end) == (1e-6, 1500)
    assert (poly.type, poly.power, poly.begin, poly.end) == \
        ('PolyLR', 1.0, 1500, 160000)


@pytest.mark.parametrize('size,dpr', [('s', 0.15), ('b', 0.3)])
def test_semfpn_recipe(size, dpr):
    cfg = load(f'configs/segmentation/semfpn_biformer_{size}_ade20k.py')
    bb = cfg.model.backbone
    assert (bb.n_win, bb.drop_path_rate) == (8, dpr)
    assert cfg.model.decode_head.num_classes == 150
    assert cfg.train_cfg.max_iters == 80000
    assert cfg.train_dataloader.batch_size == 2
    opt = cfg.optim_wrapper.optimizer
    assert (opt.lr, opt.weight_decay) == (2e-4, 1e-4)
    warm, cos = cfg.param_scheduler
    assert (warm.start_factor, warm.end) == (0.1, 1000)
    assert (cos.type, cos.begin, cos.end) == ('CosineAnnealingLR', 1000,
                                               80000)


@pytest.mark.parametrize('name', CONFIGS)
def test_model_builds_and_runs(name):
    """Each model builds from its config (ImageNet weights left out) and
    produces the task's output on a small input."""
    import importlib

    import torch
    from mmengine.registry import init_default_scope

    import mmbiformer  # noqa: F401

    cfg = load(name)
    cfg.model.backbone.init_cfg = None
    scope = cfg.default_scope
    init_default_scope(scope)
    model = importlib.import_module(f'{scope}.registry').MODELS.build(
        cfg.model)
    model.init_weights()
    model.eval()
    size = 112 if scope == 'mmpretrain' else 96
    x = torch.rand(1, 3, size, size) * 255
    with torch.no_grad():
        feats = model.extract_feat(
            model.data_preprocessor(dict(inputs=[x[0]]))['inputs'])
    if scope == 'mmpretrain':
        # (1, C) after the pooling neck; the token-labeling head pools
        # itself and gets the (1, C, h, w) map
        assert feats[-1].shape[:2] == (1, model.head.in_channels)
        assert model.head.fc.out_features == 1000
    else:
        assert all(f.shape[0] == 1 for f in feats)
        assert feats[0].shape[1] == 256 or scope == 'mmseg'
