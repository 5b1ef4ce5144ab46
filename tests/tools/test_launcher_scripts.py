"""The shell launchers hand the right command lines to torchrun and srun
(both replaced by recorders here; the real torchrun runs in test_dist*)."""
import os
import os.path as osp
import subprocess

import pytest
from conftest import REPO


@pytest.fixture
def recorder(tmp_path):
    """A fake ``srun`` on PATH and a fake Python, each printing its argv."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('srun', 'python'):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name}: $*"\n')
        exe.chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
               PYTHON=str(bin_dir / 'python'))
    return env


def launch(script, *args, env):
    return subprocess.run(['bash', osp.join('tools', script), *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_dist_scripts(recorder):
    env = dict(recorder, NNODES='2', NODE_RANK='1', PORT='1234',
               MASTER_ADDR='10.0.0.1')
    out = launch('dist_train.sh', 'cfg.py', '4', '--resume', env=env).stdout
    assert out.strip() == (
        'python: -m torch.distributed.run --nnodes=2 --node_rank=1 '
        '--master_addr=10.0.0.1 --master_port=1234 --nproc_per_node=4 '
        f'{REPO}/tools/train.py --launcher pytorch cfg.py --resume')
    out = launch('dist_test.sh', 'cfg.py', 'ck.pth', '2', '--out', 'r.pkl',
                 env=recorder).stdout
    assert out.strip().endswith(
        '--nnodes=1 --node_rank=0 --master_addr=127.0.0.1 '
        '--master_port=29500 --nproc_per_node=2 '
        f'{REPO}/tools/test.py --launcher pytorch cfg.py ck.pth --out r.pkl')


def test_slurm_scripts(recorder):
    env = dict(recorder, GPUS='16', SRUN_ARGS='--quotatype=auto')
    out = launch('slurm_train.sh', 'part', 'job', 'cfg.py', 'work', '--amp',
                 env=env).stdout
    assert out.strip() == (
        'srun: -p part --job-name=job --gres=gpu:8 --ntasks=16 '
        '--ntasks-per-node=8 --cpus-per-task=5 --kill-on-bad-exit=1 '
        f'--quotatype=auto {recorder["PYTHON"]} -u {REPO}/tools/train.py '
        '--launcher=slurm cfg.py --work-dir=work --amp')
    out = launch('slurm_test.sh', 'part', 'job', 'cfg.py', 'ck.pth',
                 env=dict(recorder, GPUS='2')).stdout
    assert '--gres=gpu:2 --ntasks=2 --ntasks-per-node=2' in out
    assert out.strip().endswith(
        f'{REPO}/tools/test.py --launcher=slurm cfg.py ck.pth')


@pytest.mark.parametrize('script,args', [
    ('dist_train.sh', ['cfg.py']), ('dist_test.sh', ['cfg.py', 'ck']),
    ('slurm_train.sh', ['p', 'j', 'cfg.py']),
    ('slurm_test.sh', ['p', 'j', 'cfg.py'])])
def test_missing_arguments_print_usage(recorder, script, args):
    proc = launch(script, *args, env=recorder)
    assert proc.returncode == 2
    assert proc.stdout.startswith('usage:')
