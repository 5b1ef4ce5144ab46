"""``--cfg-options compile=True``: tools/train.py compiles every BiFormer
backbone (``mmbiformer.apis.launch.compile_backbones``); one config of each
task trains a few iterations so on the built-in data (a BiFormer-T
backbone, small images, to keep the compile short)."""
import re

import pytest
from conftest import PYTHON, REPO, run

from mmbiformer.apis import builtin_data_options, load_config

CONFIGS = {
    'mmpretrain': ('configs/classification/biformer_t_in1k.py', 112),
    'mmdet': ('configs/detection/retinanet_biformer_s_coco.py', 64),
    'mmseg': ('configs/segmentation/semfpn_biformer_s_ade20k.py', 64),
}
ITERS = 3


@pytest.mark.slow
@pytest.mark.parametrize('scope', sorted(CONFIGS))
def test_compile_true_trains(scope, demo_root, tmp_path):
    import os.path as osp
    name, size = CONFIGS[scope]
    cfg = load_config(osp.join(REPO, name))
    by_iter = 'max_iters' in cfg.train_cfg
    opts = builtin_data_options(cfg, root=demo_root, img_size=size,
                                length=ITERS if by_iter else 1, workers=0,
                                log_interval=1, n_train=2 * ITERS,
                                batch_size=2)
    opts += [
        'compile=True', 'model.backbone.arch=tiny',
        'model.backbone.init_cfg=None', 'model.backbone.drop_path_rate=0.1',
        f'train_dataloader.dataset.indices={2 * ITERS}',
        'val_dataloader.dataset.indices=1', 'val_dataloader.batch_size=1',
        'default_hooks.checkpoint.save_last=False',
        'default_hooks.checkpoint.interval=100',
    ]
    if scope == 'mmdet':
        opts.append('val_evaluator.metric=bbox')
    out = run([PYTHON, 'tools/train.py', name, '--work-dir', str(tmp_path),
               '--cfg-options', *opts], timeout=1500).stdout
    assert 'compile: 1 BiFormer backbone(s) through torch.compile(' \
        'fullgraph=True)' in out, out[-3000:]
    losses = re.findall(
        r'(?:Epoch\(train\) *\[1\]|Iter\(train\)) *\[(\d+)/\d+\].*?'
        r'\bloss: ([0-9.e+-]+|nan)', out)
    assert [int(i) for i, _ in losses] == list(range(1, ITERS + 1)), \
        out[-3000:]
    assert all(v != 'nan' for _, v in losses), losses
