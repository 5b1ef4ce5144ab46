"""Every config trains one iteration and validates on the built-in data
through tools/train.py (reduced image size and iterations by
--cfg-options)."""
import glob
import os.path as osp
import re

import pytest
from conftest import PYTHON, REPO, run

from mmbiformer.apis import builtin_data_options, load_config

# token-labeling configs need label files: tools/token_label_demo.py trains
# them on the built-in data after writing those
CONFIGS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '*', '*.py'))
    if '_tl_' not in osp.basename(p))
# the smallest sizes the models take: n_win=7 without auto_pad needs sides
# that are multiples of 112; the dense models pad
SIZES = dict(mmpretrain=112, mmdet=64, mmseg=64)
METRIC = dict(mmpretrain='accuracy/top1', mmdet='coco/bbox_mAP',
              mmseg='mIoU')


def one_iteration_options(cfg, root):
    scope = cfg.default_scope
    opts = builtin_data_options(cfg, root=root, img_size=SIZES[scope],
                                length=1, workers=0, log_interval=1,
                                n_train=2,
                                batch_size=2)
    opts += [
        'model.backbone.init_cfg=None',
        # two samples: one training iteration, a short validation pass
        'train_dataloader.dataset.indices=2',
        'val_dataloader.dataset.indices=2', 'val_dataloader.batch_size=1',
        # no checkpoint files (the B models' are large)
        'default_hooks.checkpoint.save_last=False',
        'default_hooks.checkpoint.interval=100',
    ]
    if scope == 'mmdet':
        opts.append('val_evaluator.metric=bbox')  # keep the test short
    return opts


@pytest.mark.slow
@pytest.mark.parametrize('name', CONFIGS)
def test_config_trains_and_validates(name, demo_root, tmp_path):
    cfg = load_config(osp.join(REPO, name))
    opts = one_iteration_options(cfg, demo_root)
    out = run([PYTHON, 'tools/train.py', name, '--work-dir', str(tmp_path),
               '--cfg-options', *opts]).stdout
    assert re.search(r'(Epoch\(train\) *\[1\]\[1/1\]|Iter\(train\) '
                     r'\[1/1\])\s.*loss', out), out[-3000:]
    # the validation pass went over both samples and evaluated them
    assert re.search(r'(Epoch\(val\) *\[1\]\[2/2\]|Iter\(val\) \[2/2\])',
                     out), out[-3000:]
    metric = METRIC[cfg.default_scope]
    if cfg.default_scope == 'mmdet' and metric not in out:
        # a detector after one iteration may keep no box at all
        assert 'results of the whole dataset is empty' in out
    else:
        assert re.search(r'(Epoch|Iter)\(val\).*' + metric, out)
    if cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper':
        import torch
        if not torch.cuda.is_available():
            assert 'training in fp32 with OptimWrapper' in out
