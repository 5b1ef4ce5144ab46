"""tools/dist_train.sh on CPU (gloo): two processes train and checkpoint;
--resume continues from the latest checkpoint; tools/dist_test.sh
evaluates with two processes."""
import os.path as osp
import re

import pytest
import torch
from conftest import REPO, free_port, run

from mmbiformer.apis import builtin_data_options, load_config

CONFIG = 'configs/segmentation/semfpn_biformer_s_ade20k.py'



def options(root, iters):
    cfg = load_config(osp.join(REPO, CONFIG))
    return builtin_data_options(cfg, root=root, img_size=64, length=iters,
                                workers=0, log_interval=1) + [
        'model.backbone.arch=tiny', 'model.backbone.init_cfg=None',
        'default_hooks.checkpoint.interval=2',
        'default_hooks.checkpoint.max_keep_ckpts=3',
        'val_dataloader.dataset.indices=4', 'test_dataloader.dataset.indices=4'
    ]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU launch test')
def test_dist_train_resume_and_test_on_cpu(demo_root, tmp_path):
    work = str(tmp_path / 'work')
    out = run(['bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir',
               work, '--cfg-options', *options(demo_root, 4)],
              env=dict(PORT=free_port())).stdout
    assert 'distributed backend gloo' in out
    assert 'Distributed launcher: pytorch' in out
    assert 'process group: 2 processes, backend gloo' in out, out[-3000:]
    assert 'Iter(train) [4/4]' in out
    assert osp.exists(osp.join(work, 'iter_4.pth'))
    ckpt = torch.load(osp.join(work, 'iter_4.pth'), map_location='cpu',
                      weights_only=False)
    assert ckpt['meta']['iter'] == 4

    # "crash" after iteration 4: --resume picks the latest checkpoint and
    # continues to iteration 6 without redoing 1..4
    out = run(['bash', 'tools/dist_train.sh', CONFIG, '2', '--work-dir',
               work, '--resume', '--cfg-options',
               *options(demo_root, 6)],
              env=dict(PORT=free_port())).stdout
    assert re.search(r'resumed epoch: \d+, iter: 4', out), out[-3000:]
    assert 'Iter(train) [1/6]' not in out
    assert 'Iter(train) [5/6]' in out and 'Iter(train) [6/6]' in out
    ckpt6 = torch.load(osp.join(work, 'iter_6.pth'), map_location='cpu',
                       weights_only=False)
    assert ckpt6['meta']['iter'] == 6
    key = 'decode_head.conv_seg.weight'
    assert not torch.equal(ckpt['state_dict'][key], ckpt6['state_dict'][key])

    out = run(['bash', 'tools/dist_test.sh', CONFIG,
               osp.join(work, 'iter_6.pth'), '2', '--work-dir',
               str(tmp_path / 'test'), '--metrics-out',
               str(tmp_path / 'metrics.json'), '--cfg-options',
               *options(demo_root, 6)],
              env=dict(PORT=free_port())).stdout
    assert re.search(r'Iter\(test\).*mIoU', out), out[-3000:]
    assert osp.exists(tmp_path / 'metrics.json')
