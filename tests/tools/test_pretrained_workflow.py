"""The demo's workflow: a classifier trained by tools/train.py initialises
the detection and segmentation backbones through
``init_cfg=dict(type='Pretrained', ...)``; a checkpoint of another
architecture is an error there unless ``strict=False`` asks for a partial
load."""
import copy
import os.path as osp

import pytest
import torch
from conftest import PYTHON, REPO, run
from mini_arch import MINI

from mmbiformer.apis.demo import DEMO_SCHEDULE, demo_config
from mmbiformer.models import BiFormer
from mmbiformer.models.checkpoint import ArchitectureMismatchError


def backbone_from(cfg, **changes):
    kwargs = copy.deepcopy(dict(cfg.model.backbone))
    kwargs.pop('type')
    kwargs.update(changes)
    return BiFormer(**kwargs)


@pytest.fixture(scope='module')
def classifier(demo_root, tmp_path_factory):
    """A mini classifier trained for one epoch by tools/train.py with the
    demo's classification config."""
    tmp = tmp_path_factory.mktemp('classifier')
    cfg = demo_config('cls', demo_root, repo=REPO)
    cfg.model.backbone.arch = dict(MINI)
    cfg.model.head.in_channels = MINI['embed_dims'][-1]
    cfg.train_cfg.max_epochs = 1
    cfg.default_hooks.checkpoint.interval = 1
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    config = str(tmp / 'cls.py')
    cfg.dump(config)
    run([PYTHON, 'tools/train.py', config, '--work-dir', str(tmp / 'work')],
        timeout=600)
    with open(tmp / 'work' / 'last_checkpoint') as f:
        return f.read().strip()


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_classifier_initialises_dense_backbone(task, classifier, demo_root):
    cfg = demo_config(task, demo_root, init_checkpoint=classifier, repo=REPO)
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained',
                                               checkpoint=classifier)
    assert DEMO_SCHEDULE[task]['config'] in \
        ('configs/detection/maskrcnn_biformer_s_coco.py',
         'configs/segmentation/semfpn_biformer_s_ade20k.py')
    backbone = backbone_from(cfg, arch=dict(MINI))
    backbone.init_weights()
    report = backbone.checkpoint_report
    assert report['missing'] == [] and report['unexpected'] == []
    assert report['shape_mismatch'] == []
    # only the dense outputs' LayerNorms are new (the classifier has one
    # BatchNorm after the last stage, which has no place here)
    assert sorted({k.split('.')[0] for k in report['new_norms']}) == \
        ['norm0', 'norm1', 'norm2', 'norm3']
    assert report['skipped_norms'] and all(
        k.startswith('norm3.') for k in report['skipped_norms'])
    trained = torch.load(classifier, map_location='cpu')['state_dict']
    own = backbone.state_dict()
    loaded = [k for k in own if not k.startswith('norm')]
    assert loaded and all(
        torch.equal(own[k], trained['backbone.' + k]) for k in loaded)


def test_other_architecture_is_an_error_unless_partial(classifier,
                                                       demo_root):
    cfg = demo_config('det', demo_root, init_checkpoint=classifier,
                      repo=REPO)
    deeper = dict(MINI, depths=[1, 1, 3, 1])
    with pytest.raises(ArchitectureMismatchError) as info:
        backbone_from(cfg, arch=deeper).init_weights()
    msg = str(info.value)
    assert osp.basename(classifier) in msg
    assert 'holds a custom BiFormer (depths [1, 1, 2, 1]' in msg
    assert 'the model is a custom BiFormer (depths [1, 1, 3, 1]' in msg

    partial = dict(cfg.model.backbone.init_cfg, strict=False)
    backbone = backbone_from(cfg, arch=deeper, init_cfg=partial)
    backbone.init_weights()
    assert backbone.checkpoint_report['missing'] == [
        k for k in backbone.state_dict() if k.startswith('stages.2.2.')]
