"""Interrupted training loses nothing (issue #7).

A CPU training run is killed with SIGKILL between two checkpoints and
started again with ``--resume``; its final weights must equal those of an
uninterrupted run with the same seed.

Tolerance: ``max |w_resumed - w_uninterrupted| <= 1e-6`` for every tensor of
the final state dict. On one machine with a fixed thread count the CPU
kernels are deterministic and the difference is exactly 0; the tolerance
only leaves room for a BLAS that splits reductions by timing. Without the
restored generator states (``RNGStateHook``) the drop-path masks of the
resumed iterations differ and the weights drift apart: the control run
below must differ by more than 100 times the tolerance.
"""
import os
import os.path as osp
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import PYTHON, REPO, run, tool_env

from mmbiformer.apis import builtin_data_options, load_config
from mmbiformer.engine import capture_rng_state, restore_rng_state

CONFIG = 'configs/segmentation/semfpn_biformer_s_ade20k.py'
ITERS = 8
TOL = 1e-6


def options(root):
    cfg = load_config(osp.join(REPO, CONFIG))
    return builtin_data_options(
        cfg, root=root, img_size=64, length=ITERS, workers=1,
        log_interval=1) + [
            'model.backbone.arch=tiny', 'model.backbone.init_cfg=None',
            # drop path draws from torch's generator every iteration
            'model.backbone.drop_path_rate=0.3',
            'default_hooks.checkpoint.interval=2',
            'default_hooks.checkpoint.max_keep_ckpts=10',
            f'train_cfg.val_interval={ITERS + 1}',
            'randomness.seed=7', 'randomness.deterministic=True']


def final_state(work):
    ckpt = torch.load(osp.join(work, f'iter_{ITERS}.pth'),
                      map_location='cpu', weights_only=True)
    return ckpt['state_dict']


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item()
               if a[k].numel() else 0.0 for k in a)


def train_cmd(work, opts, *extra):
    return [PYTHON, 'tools/train.py', CONFIG, '--work-dir', work, *extra,
            '--cfg-options', *opts]


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng_state()
    path = tmp_path / 'rng.pth'
    torch.save(dict(rng_states=[state]), path)
    loaded = torch.load(path, weights_only=True)['rng_states'][0]
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move on
    assert restore_rng_state(loaded) == ['torch', 'numpy', 'python']
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], again[0])
    assert np.array_equal(expect[1], again[1])
    assert expect[2] == again[2]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(demo_root, tmp_path):
    opts = options(demo_root)

    # 1. the uninterrupted run
    ref = str(tmp_path / 'ref')
    run(train_cmd(ref, opts))
    ref_state = final_state(ref)

    # 2. the same run, killed once iter_4.pth is complete and before the
    #    next checkpoint
    work = str(tmp_path / 'killed')
    os.makedirs(work)
    log = open(osp.join(work, 'first.log'), 'w')
    proc = subprocess.Popen(train_cmd(work, opts), cwd=REPO, env=tool_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    marker = osp.join(work, 'last_checkpoint')
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if osp.exists(marker):
                with open(marker) as f:
                    if f.read().strip().endswith('iter_4.pth'):
                        break
            time.sleep(0.02)
        assert proc.poll() is None, 'the run ended before it was killed'
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not osp.exists(osp.join(work, f'iter_{ITERS}.pth'))

    # 3. --resume continues from the last complete checkpoint
    out = run(train_cmd(work, opts, '--resume')).stdout
    m = re.search(r'resumed epoch: \d+, iter: (\d+)', out)
    assert m and 4 <= int(m.group(1)) < ITERS, out[-3000:]
    assert 'RNGStateHook: restored the torch generator' in out, out[-3000:]
    diff = max_diff(final_state(work), ref_state)
    assert diff <= TOL, f'resumed run differs from the uninterrupted one ' \
        f'by {diff:.3g}'

    # 4. control: the same resume without the generator states drifts,
    #    so the comparison above can fail
    ctrl = str(tmp_path / 'control')
    os.makedirs(ctrl)
    ckpt = torch.load(osp.join(work, 'iter_4.pth'), map_location='cpu',
                      weights_only=True)
    ckpt.pop('rng_states')
    torch.save(ckpt, osp.join(ctrl, 'iter_4.pth'))
    out = run(train_cmd(ctrl, opts, '--resume',
                        osp.join(ctrl, 'iter_4.pth'))).stdout
    assert 'holds no generator states' in out, out[-3000:]
    assert max_diff(final_state(ctrl), ref_state) > 100 * TOL
