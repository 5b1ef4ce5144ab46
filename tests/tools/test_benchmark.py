"""tools/analysis/benchmark.py, mmbiformer.analysis.benchmark and the
experiment scripts of benchmarks/."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmbiformer.analysis.benchmark import parse_target, run_benchmark

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TINY = osp.join(REPO, 'configs', 'classification', 'biformer_t_in1k.py')


def test_parse_target_overrides():
    path, over = parse_target(
        'a.py@model.backbone.attn_backend=official,model.backbone.n_win=8')
    assert path == 'a.py'
    assert over == {'model.backbone.attn_backend': 'official',
                    'model.backbone.n_win': 8}
    with pytest.raises(ValueError, match='key=value'):
        parse_target('a.py@official')


@pytest.mark.parametrize('mode,optimizer', [('infer', 'adamw'),
                                            ('train', 'adamw'),
                                            ('train', 'adamw-fused')])
def test_run_benchmark_reports_one_measurement(mode, optimizer):
    res = run_benchmark(TINY + '@model.backbone.attn_backend=reference',
                        mode=mode, batch=1, warmup=0, repeats=1,
                        device='cpu', optimizer=optimizer).as_dict()
    assert res['mode'] == mode and res['batch'] == 1
    assert res['img_per_s'] > 0 and res['ms_per_iter'] > 0
    assert res['device'].startswith('cpu')
    assert res['optimizer'] == (optimizer if mode == 'train' else None)
    assert 'profile' not in res


def test_run_benchmark_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match='adamw-fused'):
        run_benchmark(TINY, mode='train', optimizer='sgd')


def test_cli_prints_json_lines():
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'analysis', 'benchmark.py'),
         TINY, '--modes', 'infer', '--infer-batch', '1', '--warmup', '0',
         '--repeats', '1', '--threads', '1', '--json'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith('{')]
    assert len(rows) == 1
    for key in ('config', 'mode', 'batch', 'img_per_s', 'peak_mem_mb',
                'device'):
        assert key in rows[0]
    assert rows[0]['config'] == TINY and rows[0]['mode'] == 'infer'


def test_run_benchmark_amp():
    """--amp: bf16 autocast (CPU: around the step); fp16 needs CUDA; an
    unknown choice is refused by name."""
    res = run_benchmark(TINY + '@model.backbone.attn_backend=reference',
                        mode='train', batch=1, warmup=0, repeats=1,
                        device='cpu', amp='bf16').as_dict()
    assert res['amp'] == 'bf16' and res['img_per_s'] > 0
    with pytest.raises(ValueError, match='needs CUDA'):
        run_benchmark(TINY, mode='train', device='cpu', amp='fp16')
    with pytest.raises(ValueError, match='bf16'):
        run_benchmark(TINY, mode='infer', device='cpu', amp='fp8')


def test_autocast_wrapper_enters_autocast():
    """The CPU bf16 training step runs its forward under autocast."""
    from mmengine.optim import OptimWrapper

    from mmbiformer.analysis.benchmark import AMP_DTYPES, _autocast_wrapper
    lin = torch.nn.Linear(4, 4)
    optim = _autocast_wrapper(
        OptimWrapper, torch.optim.SGD(lin.parameters(), lr=0.1),
        lambda: torch.autocast('cpu', dtype=AMP_DTYPES['bf16']))
    with optim.optim_context(lin):
        y = lin(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_bra_benchmark_dtype_and_in_process_flags():
    script = osp.join(REPO, 'tools', 'analysis', 'benchmark_bra.py')
    proc = subprocess.run(
        [sys.executable, script, '--shape', 's=1,14,14,32,1,7,4',
         '--backends', 'torch', '--dtype', 'bfloat16', '--repeat', '1',
         '--json'], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row['dtype'] == 'bfloat16' and row['status'] == 'ok'
    proc = subprocess.run(
        [sys.executable, script, '--shape', 's=1,14,14,32,1,7,4',
         '--in-process'], capture_output=True, text=True, cwd=REPO,
        timeout=600)
    assert proc.returncode != 0 and '--in-process needs --device cuda' in \
        proc.stderr


def test_triton_backward_ab_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip('exercised on a GPU by running it')
    proc = subprocess.run(
        [sys.executable,
         osp.join(REPO, 'benchmarks', 'triton_backward_ab.py')],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0 and 'needs a CUDA device' in proc.stderr


def test_ab_train_step_cli(tmp_path):
    """ab_train_step.py alternates the code as it is and a patched variant
    and reports both; the patched object is put back afterwards."""
    out = tmp_path / 'calls.txt'
    probe = tmp_path / 'ab_probe.py'
    probe.write_text(
        'import torch.nn.functional as F\n'
        'GELU = F.gelu\n'
        f'OUT = {str(out)!r}\n'
        'def patched(x, **kwargs):\n'
        '    open(OUT, "a").write("x")\n'
        '    return GELU(x, **kwargs)\n')
    proc = subprocess.run(
        [sys.executable,
         osp.join(REPO, 'benchmarks', 'ab_train_step.py'),
         # no drop path: every block's MLP runs in every step
         TINY + '@model.backbone.drop_path_rate=0.0',
         '--target', 'torch.nn.functional:gelu',
         '--replacement', 'ab_probe:patched', '--pairs', '1', '--warmup',
         '0', '--batch', '1', '--threads', '1'],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row['pairs'] == 1 and row['median_ms_as_is'] > 0
    assert row['median_ms_patched'] > 0
    # one patched step through every GELU: the stem's and every block's
    # MLP (BiFormer-T: depths 2, 2, 8, 2)
    assert len(out.read_text()) == 1 + 14


def test_ab_train_step_returning_a_constant(tmp_path):
    """--returning: the patched variant uses a function that returns the
    constant (here: torch.compiler.is_exporting); a missing
    --replacement / --returning is refused."""
    script = osp.join(REPO, 'benchmarks', 'ab_train_step.py')
    proc = subprocess.run(
        [sys.executable, script, TINY, '--target',
         'torch.compiler:is_exporting', '--returning', 'False',
         '--pairs', '1', '--warmup', '0', '--batch', '1', '--threads', '1'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row['replacement'] == 'returning False'
    assert row['median_ms_patched'] > 0
    proc = subprocess.run(
        [sys.executable, script, TINY, '--target',
         'torch.compiler:is_exporting'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 2
    assert 'one of the arguments --replacement --returning' in proc.stderr


def test_ab_train_step_infers_with_a_detector():
    """--mode infer with a detector: the network's forward in eval mode
    (the synthetic batch carries no image metadata for post-processing)."""
    proc = subprocess.run(
        [sys.executable,
         osp.join(REPO, 'benchmarks', 'ab_train_step.py'),
         osp.join(REPO, 'configs', 'detection', 'retinanet_biformer_s_coco.py')
         + '@model.backbone.arch=tiny', '--mode', 'infer', '--img-size',
         '128', '--target', 'torch.compiler:is_exporting', '--returning',
         'False', '--pairs', '1', '--warmup', '0', '--batch', '1',
         '--threads', '1'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row['mode'] == 'infer' and row['median_ms_as_is'] > 0


def test_train_phases_cli():
    """train_phases.py times forward, backward and optimizer of every
    config's training step, the configs taking turns in one process."""
    proc = subprocess.run(
        [sys.executable,
         osp.join(REPO, 'benchmarks', 'train_phases.py'), TINY,
         TINY + '@model.backbone.attn_backend=official', '--steps', '2',
         '--warmup', '0', '--batch', '1', '--img-size', '112', '--threads',
         '1'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()
            if line.startswith('{')]
    assert [r['config'] for r in rows] == [
        TINY, TINY + '@model.backbone.attn_backend=official']
    for r in rows:
        assert r['steps'] == 2 and r['batch'] == 1
        assert all(r[f'{k}_ms'] > 0 for k in ('forward', 'backward',
                                               'optimizer'))
        # the median step is at least its largest phase's median
        assert r['step_ms'] >= max(r['forward_ms'], r['backward_ms'])


@pytest.mark.parametrize('accelerate', [False, True])
def test_in_process_case_accelerates_biformer_backbones(accelerate):
    from mmbiformer.analysis.interleaved import Case, _built, run_interleaved
    from mmbiformer.models.accelerate import AcceleratedBlock
    case = Case(TINY, 'train', 2, img_size=(224, 224), accelerate=accelerate)
    _, model = _built(case)
    blocks = [m for m in model.modules() if isinstance(m, AcceleratedBlock)]
    assert bool(blocks) is accelerate
    if accelerate:
        rec, = run_interleaved([case], warmup=1, repeats=1, rounds=1,
                               profile=False)
        assert rec['accelerated'] is True and rec['ms_per_step'] > 0


def test_before_after_cli(tmp_path):
    """before_after.py imports an older checkout's package beside the
    current one (here the current tree as its own "before": the renamed
    copy must not collide with it in the registries or torch.library),
    transforms it with its own accelerate() and reports both against
    Swin-T."""
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'benchmarks', 'before_after.py'),
         REPO, '--arch', 'tiny', '--modes', 'infer', '--infer-batch', '1',
         '--rounds', '1', '--warmup', '0', '--threads', '1', '--hybrid'],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith('infer:')]
    assert line and 'before' in line[0] and 'after' in line[0] and \
        'hybrid' in line[0] and 'Swin-T / after' in line[0], proc.stdout
    assert 'minor page faults' in proc.stdout, proc.stdout
    # an older version with an accelerate() runs after it, as its tools did
    assert 'after its accelerate()' in proc.stdout, proc.stdout


def test_fault_sources_cli():
    """fault_sources.py counts one training step's page faults and
    attributes them to operators (every count a non-negative integer, the
    operators' share at most the step's total)."""
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'benchmarks', 'fault_sources.py'),
         '--arch', 'tiny', '--batch', '1', '--warmup', '1', '--threads', '1',
         '--top', '5'],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    head = proc.stdout.splitlines()[0].split()
    total, inside = int(head[0]), int(head[-3])
    assert head[1:4] == ['minor', 'faults', 'in'], proc.stdout
    assert 0 <= inside <= total, proc.stdout
    assert 'by operator:' in proc.stdout, proc.stdout
