"""The demo's schedule (``make demo``): each task's demo config is the real
config with :data:`DEMO_SCHEDULE` merged in, builds, and takes a training
step; the three models share the demo backbone, so the classifier's
checkpoint initialises the dense ones; every run is seeded. No training
here (the tests of the whole workflow are test_pretrained_workflow.py and
test_infer.py)."""
import importlib
import math
import warnings

import pytest
import torch
from conftest import REPO
from mmengine.config import Config

from mmbiformer.apis.demo import (
    DEMO_ARCH,
    DEMO_SCHEDULE,
    chance_levels,
    demo_config,
    demo_train_images,
)
from mmbiformer.apis.launch import adapt_to_host

TASKS = ('cls', 'det', 'seg')


def build(cfg):
    from mmengine.registry import init_default_scope

    import mmbiformer  # noqa: F401

    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    return registry


@pytest.mark.parametrize('task', TASKS)
def test_demo_config_builds_and_steps(task, demo_root, tmp_path):
    init = None if task == 'cls' else str(tmp_path / 'cls.pth')
    cfg = demo_config(task, demo_root, init_checkpoint=init, repo=REPO)
    spec = DEMO_SCHEDULE[task]
    # the demo architecture, its seed, no validation during training
    assert dict(cfg.model.backbone.arch) == DEMO_ARCH
    assert cfg.model.backbone.type == 'BiFormer'
    assert cfg.randomness.seed == spec['seed']
    assert cfg.val_dataloader is None and cfg.test_dataloader is not None
    if init:
        assert cfg.model.backbone.init_cfg == dict(type='Pretrained',
                                                   checkpoint=init)
    # the merged config survives the round trip through the file that the
    # demo writes and tools/train.py reads
    path = str(tmp_path / 'demo.py')
    cfg.dump(path)
    again = Config.fromfile(path)
    assert again.model.backbone.arch == cfg.model.backbone.arch
    assert again.train_cfg == cfg.train_cfg

    # one training step of the model on a batch of the built-in data
    with warnings.catch_warnings():  # the CPU fallbacks (fp32, BN)
        warnings.simplefilter('ignore')
        adapt_to_host(cfg, 'none')
    registry = build(cfg)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = registry.MODELS.build(cfg.model)
    model.init_weights()
    from mmengine.runner import Runner
    loader = dict(cfg.train_dataloader, num_workers=0,
                  persistent_workers=False, batch_size=2)
    batch = next(iter(Runner.build_dataloader(loader)))
    model.train()
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    total = sum(v.sum() for k, v in losses.items() if 'loss' in k
                and isinstance(v, torch.Tensor))
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.backbone.parameters()
               if p.requires_grad)


def test_schedule_length_and_lr(demo_root):
    """The scheduler runs exactly over the training steps and ends at a
    hundredth of the demo LR."""
    for task in TASKS:
        spec = DEMO_SCHEDULE[task]
        cfg = demo_config(task, demo_root, repo=REPO)
        n = demo_train_images(demo_root, task)
        steps = (spec['epochs'] * math.ceil(n / spec['batch_size'])
                 if 'epochs' in spec else spec['iters'])
        warm, cosine = cfg.param_scheduler
        assert warm.begin == 0 and warm.end == cosine.begin
        assert cosine.end == steps
        assert cosine.eta_min == pytest.approx(spec['lr'] / 100)
        assert cfg.optim_wrapper.optimizer.type == 'AdamW'
        assert cfg.optim_wrapper.optimizer.lr == spec['lr']


def test_chance_levels_are_far_below_the_targets(demo_root):
    chance = chance_levels(demo_root)
    assert chance['cls']['top1'] == pytest.approx(100 / 6)
    assert 0 <= chance['det']['bbox_mAP'] < 0.05
    assert 0 < chance['seg']['mIoU'] < 25


def test_seg_weighs_the_object_classes(demo_root):
    """Semantic FPN's loss weighs each object class ``object_weight``
    times a stuff class, and no training crop needs padding (mmseg's
    class-weighted cross-entropy cannot take the ignored label)."""
    spec = DEMO_SCHEDULE['seg']
    cfg = demo_config('seg', demo_root, repo=REPO)
    classes = cfg.train_dataloader.dataset.metainfo['classes']
    weights = cfg.model.decode_head.loss_decode.class_weight
    assert len(weights) == len(classes) == cfg.model.decode_head.num_classes
    assert set(spec['stuff']) < set(classes)
    for name, w in zip(classes, weights):
        assert w == (1.0 if name in spec['stuff'] else spec['object_weight'])
    resize = [t for t in cfg.train_dataloader.dataset.pipeline
              if t['type'] == 'RandomResize'][0]
    assert min(resize['ratio_range']) >= 1.0
