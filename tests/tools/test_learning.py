"""A short training on the built-in data lifts the task metric clearly above
its value at initialisation (tools/train.py, then tools/test.py on the
initial and on the trained weights)."""
import json
import os.path as osp

import pytest
from conftest import PYTHON, REPO, run

from mmbiformer.apis import (
    builtin_data_options,
    load_config,
    save_initial_checkpoint,
)
from mmbiformer.apis.launch import parse_kv

CONFIG = 'configs/segmentation/semfpn_biformer_s_ade20k.py'
ITERS = 120
# Thresholds. At initialisation the segmenter predicts classes that are not
# in the data: mIoU and pixel accuracy ~0 %. After 120 iterations (4 crops
# of 64x64 each; measured: mIoU 7.6 %, pixel accuracy 34 %) the large stuff
# regions (sky, wall, floor, each with its own surface pattern) are mostly
# found:
MIN_GAIN_MIOU = 4.0    # mIoU points above the initial value
MIN_GAIN_AACC = 20.0   # pixel accuracy points above the initial value


def evaluate(ckpt, opts, work, out):
    run([PYTHON, 'tools/test.py', CONFIG, ckpt, '--work-dir', work,
         '--metrics-out', out, '--cfg-options', *opts])
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
def test_short_training_beats_initialisation(demo_root, tmp_path):
    cfg = load_config(osp.join(REPO, CONFIG))
    opts = builtin_data_options(cfg, root=demo_root, img_size=64,
                                length=ITERS, workers=1, batch_size=4,
                                log_interval=20)
    opts += ['model.backbone.arch=tiny', 'model.backbone.init_cfg=None',
             'randomness.seed=0']
    init_cfg = load_config(osp.join(REPO, CONFIG), parse_kv(opts))
    init_ckpt = save_initial_checkpoint(init_cfg, str(tmp_path / 'init.pth'))
    before = evaluate(init_ckpt, opts, str(tmp_path / 'test0'),
                      str(tmp_path / 'm0.json'))

    work = str(tmp_path / 'work')
    run([PYTHON, 'tools/train.py', CONFIG, '--work-dir', work,
         '--cfg-options', *opts])
    after = evaluate(osp.join(work, f'iter_{ITERS}.pth'), opts,
                     str(tmp_path / 'test1'), str(tmp_path / 'm1.json'))
    print('before', before, 'after', after)
    assert after['mIoU'] >= before['mIoU'] + MIN_GAIN_MIOU, (before, after)
    assert after['aAcc'] >= before['aAcc'] + MIN_GAIN_AACC, (before, after)
