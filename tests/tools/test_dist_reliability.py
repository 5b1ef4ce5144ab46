"""Distributed reliability (issue #7), two CPU processes (gloo) through
``tools/dist_train.sh``:

* after some iterations both ranks hold identical weights (parameters and
  buffers, bit for bit), and they differ from the initial ones;
* one rank crashing (an exception, or SIGKILL) ends the whole job with a
  non-zero exit instead of leaving the other rank waiting in a collective
  forever; the bound is the ``HANG_LIMIT`` timeout of the launch, after
  which the test fails and kills the process group.
"""
import os
import os.path as osp
import signal
import subprocess

import pytest
import torch
from conftest import REPO, free_port, run, tool_env

from mmbiformer.apis import builtin_data_options, load_config

CONFIG = 'configs/segmentation/semfpn_biformer_s_ade20k.py'
PROBE_DIR = osp.dirname(osp.abspath(__file__))  # holds dist_probe.py
HANG_LIMIT = 300  # seconds; a healthy crash ends in well under a minute

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason='CPU launch test'),
]



def probe_config(tmp_path, **probe):
    """The real config plus the test-only ``RankProbeHook``."""
    path = tmp_path / 'probe_config.py'
    path.write_text(
        f'_base_ = [{osp.join(REPO, CONFIG)!r}]\n'
        "custom_imports = dict(imports=['mmbiformer', 'dist_probe'], "
        'allow_failed_imports=False)\n'
        f'custom_hooks = [dict(type="RankProbeHook", **{probe!r})]\n')
    return str(path)


def options(root, iters):
    cfg = load_config(osp.join(REPO, CONFIG))
    return builtin_data_options(cfg, root=root, img_size=64, length=iters,
                                workers=0, log_interval=1) + [
        'model.backbone.arch=tiny', 'model.backbone.init_cfg=None',
        f'train_cfg.val_interval={iters + 1}',
        f'default_hooks.checkpoint.interval={iters + 1}',
    ]


def launch_env():
    return dict(PORT=free_port(),
                PYTHONPATH=os.pathsep.join(
                    [REPO, PROBE_DIR, os.environ.get('PYTHONPATH', '')]))


def test_both_ranks_hold_identical_weights(demo_root, tmp_path):
    dump = str(tmp_path / 'dump')
    cfg = probe_config(tmp_path, dump_dir=dump)
    out = run(['bash', 'tools/dist_train.sh', cfg, '2', '--work-dir',
               str(tmp_path / 'work'), '--cfg-options',
               *options(demo_root, 4)], env=launch_env()).stdout
    assert 'process group: 2 processes, backend gloo' in out, out[-3000:]
    assert 'Iter(train) [4/4]' in out

    states = {tag: [torch.load(osp.join(dump, f'{tag}_rank{r}.pth'),
                               weights_only=True) for r in (0, 1)]
              for tag in ('init', 'final')}
    final0, final1 = states['final']
    assert final0.keys() == final1.keys()
    differ = [k for k in final0 if not torch.equal(final0[k], final1[k])]
    assert not differ, f'ranks disagree on {len(differ)} tensors: ' \
        f'{differ[:5]}'
    # the ranks did train (so the equality is not that of untouched
    # weights), and BN statistics are among the identical tensors
    moved = [k for k in final0
             if not torch.equal(final0[k], states['init'][0][k])]
    assert any(k.endswith('.weight') for k in moved)
    assert any(k.endswith('running_mean') for k in moved)


@pytest.mark.parametrize('mode', ['raise', 'kill'])
def test_a_crashing_rank_ends_the_job(demo_root, tmp_path, mode):
    cfg = probe_config(tmp_path, crash_rank=1, crash_iter=2,
                       crash_mode=mode)
    cmd = ['bash', 'tools/dist_train.sh', cfg, '2', '--work-dir',
           str(tmp_path / 'work'), '--cfg-options', *options(demo_root, 50)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(tool_env(),
                                                    **launch_env()),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HANG_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f'the job still ran {HANG_LIMIT}s after rank 1 '
                    f'crashed:\n{out[-3000:]}')
    assert proc.returncode != 0, out[-3000:]
    assert 'rank 1 crashes after iteration 2' in out, out[-3000:]
    # rank 0 did not go on training alone
    assert 'Iter(train) [50/50]' not in out
    if mode == 'raise':
        assert 'RankProbeHook: simulated crash' in out
    # nothing of the job is left running
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
