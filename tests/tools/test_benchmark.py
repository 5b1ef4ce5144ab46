"""tools/analysis/benchmark.py and mmbiformer.analysis.benchmark."""
import json
import os.path as osp
import subprocess
import sys

import pytest

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
