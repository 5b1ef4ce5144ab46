"""Tool logic without running a model: CPU fallbacks, resume, overrides."""
import os.path as osp

import pytest
import torch
from conftest import REPO

from mmbiformer.apis import (
    adapt_to_host,
    builtin_data_options,
    enable_visualization,
    load_config,
    setup_amp,
    setup_resume,
)
from mmbiformer.apis.launch import parse_kv

DET = osp.join(REPO, 'configs/detection/maskrcnn_biformer_s_coco.py')
SEG = osp.join(REPO, 'configs/segmentation/upernet_biformer_s_ade20k.py')
SEMFPN = osp.join(REPO, 'configs/segmentation/semfpn_biformer_s_ade20k.py')
CLS = osp.join(REPO, 'configs/classification/biformer_t_in1k.py')
RETINA = osp.join(REPO, 'configs/detection/retinanet_biformer_s_coco.py')
no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason='tests the behaviour without CUDA')


@no_cuda
def test_cpu_turns_amp_into_fp32_and_syncbn_into_bn():
    cfg = load_config(SEG)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    with pytest.warns(UserWarning, match='fp32'):
        adapt_to_host(cfg, 'none')
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    assert 'loss_scale' not in cfg.optim_wrapper
    assert cfg.optim_wrapper.optimizer.lr == 6e-5  # the rest is kept
    assert cfg.model.decode_head.norm_cfg.type == 'BN'
    assert cfg.model.auxiliary_head.norm_cfg.type == 'BN'
    assert 'model_wrapper_cfg' not in cfg


@no_cuda
def test_cpu_distributed_uses_gloo_and_cpu_ddp():
    cfg = load_config(RETINA)
    adapt_to_host(cfg, 'pytorch')
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    w = cfg.model_wrapper_cfg
    assert w.type == 'MMDistributedDataParallel'
    assert w.device_ids is None  # a CPU module takes no device ids
    assert w.find_unused_parameters is True  # from the RetinaNet config
    # BN statistics are averaged over the ranks in place of SyncBN
    assert [h['type'] for h in cfg.custom_hooks].count(
        'SyncNormStatsHook') == 1
    adapt_to_host(cfg, 'pytorch')  # idempotent
    assert [h['type'] for h in cfg.custom_hooks].count(
        'SyncNormStatsHook') == 1


@no_cuda
def test_amp_flag_without_cuda_is_reported_not_applied(capsys):
    cfg = load_config(CLS)
    setup_amp(cfg, True)
    assert cfg.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'
    assert 'needs CUDA' in capsys.readouterr().out


def test_resume_semantics():
    cfg = load_config(CLS)
    setup_resume(cfg, None)
    assert not cfg.get('resume', False)
    setup_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from is None
    setup_resume(cfg, 'x/epoch_3.pth')
    assert cfg.resume is True and cfg.load_from == 'x/epoch_3.pth'


def test_show_dir_per_toolbox():
    cfg = load_config(DET)
    enable_visualization(cfg, 'vis')
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == 'vis'
    cfg = load_config(SEG)
    enable_visualization(cfg, 'vis')
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.visualizer.save_dir == 'vis'
    cfg = load_config(CLS)
    enable_visualization(cfg, 'vis')
    assert cfg.default_hooks.visualization.enable is True
    assert cfg.default_hooks.visualization.out_dir == 'vis'


def merged(path, **kw):
    cfg = load_config(path)
    opts = builtin_data_options(cfg, root='data/demo', **kw)
    assert all(' ' not in o for o in opts)  # safe to paste in a shell
    cfg.merge_from_dict(parse_kv(opts))
    return cfg


def test_builtin_options_det():
    cfg = merged(DET, img_size=96, length=2, n_train=200)
    assert cfg.train_dataloader.dataset.data_root == 'data/demo/coco/'
    assert cfg.val_evaluator.ann_file == \
        'data/demo/coco/annotations/instances_val2017.json'
    resize = [t for t in cfg.train_dataloader.dataset.pipeline
              if t.type == 'Resize'][0]
    assert tuple(resize.scale) == (96, 96)
    assert cfg.train_cfg.max_epochs == 2
    warm, step = cfg.param_scheduler
    assert warm.by_epoch is False and 2 <= warm.end <= 500
    assert step.end == 2 and max(step.milestones) <= 2
    # what the demo does not touch stays as the recipe has it
    assert cfg.optim_wrapper.optimizer.lr == 1e-4
    assert cfg.train_dataloader.batch_size == 2


def test_builtin_options_seg_keep_warmup_meeting_decay():
    cfg = merged(SEMFPN, img_size=64, length=300)
    warm, cos = cfg.param_scheduler
    assert warm.end == cos.begin >= 2
    assert cos.end == 300 and cos.T_max == 300 - cos.begin
    assert tuple(cfg.model.data_preprocessor.size) == (64, 64)
    crop = [t for t in cfg.train_dataloader.dataset.pipeline
            if t.type == 'RandomCrop'][0]
    assert tuple(crop.crop_size) == (64, 64)
    assert cfg.train_cfg.max_iters == 300
    assert cfg.default_hooks.checkpoint.interval == 300


def test_builtin_options_cls_scales_ema_and_warmup():
    cfg = merged(CLS, img_size=112, length=3, batch_size=32, n_train=480)
    assert cfg.train_dataloader.batch_size == 32
    warm, cos = cfg.param_scheduler
    # 15 iterations per epoch: warm-up lands on whole iterations (>= 2)
    assert int(warm.end * 15) >= 2
    assert cos.end == 3
    (ema, ) = cfg.custom_hooks
    assert 4e-5 < ema.momentum <= 0.5
    crop = [t for t in cfg.val_dataloader.dataset.pipeline
            if t.type == 'CenterCrop'][0]
    assert crop.crop_size == 112


def test_accelerate_option_auto_on_cpu_false_and_bad_value(
        capsys, monkeypatch):
    import torch.nn as nn
    from mini_arch import MINI

    from mmbiformer.apis.launch import accelerate_backbones
    from mmbiformer.models import BiFormer
    from mmbiformer.ops.accelerate import AcceleratedMlp

    def model():
        return nn.ModuleDict(dict(backbone=BiFormer(arch=dict(MINI)),
                                  head=nn.Linear(4, 4)))

    plain = model()
    assert not accelerate_backbones(plain, False)
    assert not any(type(m) is AcceleratedMlp for m in plain.modules())
    # compiled backbones stay plain under 'auto'
    assert not accelerate_backbones(plain, 'auto', compiled=True)
    # 'auto' on CPU parameters: only at the measured levels
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability',
                        lambda: 'DEFAULT')
    assert not accelerate_backbones(plain)
    assert accelerate_backbones(plain, True)  # forced
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability',
                        lambda: 'AVX2')
    fast = model()
    assert accelerate_backbones(fast)
    assert any(type(m) is AcceleratedMlp for m in fast.modules())
    assert type(fast['head']) is nn.Linear
    assert 'accelerate: 1 BiFormer backbone(s)' in capsys.readouterr().out
    with pytest.raises(ValueError, match="'auto', True or False"):
        accelerate_backbones(plain, 'yes')
