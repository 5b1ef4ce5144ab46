"""Kernels per step and busy fraction from torch.profiler
(:mod:`mmbiformer.analysis.profiling`) and the in-process interleaved
benchmark (:mod:`mmbiformer.analysis.interleaved`), on the CPU."""
import importlib.util
import json
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from mmbiformer.analysis.profiling import (
    STEP_RANGE,
    profile_step,
    summarize,
    union_length,
)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0.0
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4.0
    assert union_length([(5, 6), (0, 10)]) == 10.0
    assert union_length([(0, 4), (6, 10)], window=(2, 8)) == 4.0
    assert union_length([(0, 1)], window=(2, 3)) == 0.0


def _evt(name, kind, start, end, device='cuda'):
    return SimpleNamespace(name=name, activity_type=kind, cpu_children=[],
                           time_range=SimpleNamespace(start=start, end=end))


def test_summarize_device_activities():
    """CUDA: kernels and copies inside the step range; runtime calls,
    annotations and work outside the step are left out."""
    events = [
        _evt(STEP_RANGE, 'user_annotation', 100.0, 1100.0),
        _evt(STEP_RANGE, 'gpu_user_annotation', 100.0, 1100.0),
        _evt('cudaLaunchKernel', 'cuda_runtime', 110.0, 120.0),
        _evt('gemm', 'kernel', 200.0, 500.0),
        _evt('gemm', 'kernel', 450.0, 600.0),   # overlaps the first
        _evt('softmax', 'kernel', 700.0, 800.0),
        _evt('Memcpy HtoD', 'gpu_memcpy', 900.0, 950.0),
        _evt('late', 'kernel', 1200.0, 1300.0),  # after the step
    ]
    s = summarize(events, 'cuda')
    assert s['kernels'] == 3 and s['copies'] == 1
    assert s['busy_ms'] == pytest.approx(0.55)
    assert s['wall_ms'] == pytest.approx(1.0)
    assert s['busy_fraction'] == pytest.approx(0.55)
    assert s['top'][0] == ('gemm', 0.45, 2)


def test_profile_step_on_the_cpu_counts_innermost_operators():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)

    def step():
        y = torch.nn.functional.gelu(x @ w).sum()
        y.backward()

    s = profile_step(step, lambda: None, 'cpu')
    names = [n for n, _, _ in s['top']]
    assert s['kernels'] >= 4  # mm, gelu, sum, their backward
    assert s['copies'] == 0
    assert 0.0 < s['busy_fraction'] <= 1.0
    assert s['busy_ms'] <= s['wall_ms']
    assert any('mm' in n or 'gelu' in n for n in names)


@pytest.fixture
def mini_config(tmp_path):
    from mini_arch import MINI
    path = tmp_path / 'mini.py'
    base = osp.join(REPO, 'configs', 'classification', 'biformer_t_in1k.py')
    path.write_text(f'_base_ = [{base!r}]\n'
                    'model = dict(backbone=dict(arch=dict(_delete_=True, '
                    f"**{MINI!r}), attn_backend='torch'), "
                    'head=dict(in_channels=256))\n')
    return str(path)


def _tool():
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool', osp.join(REPO, 'tools', 'analysis', 'benchmark.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_in_process_cases_are_interleaved(mini_config):
    """Every compile mode, then mode, then batch, then config: the configs
    alternate at each setting."""
    tool = _tool()
    other = mini_config + '@model.backbone.drop_path_rate=0.0'
    args = tool.parse_args([mini_config, other, '--in-process',
                            '--compile-modes', 'eager', 'reduce-overhead',
                            '--train-batches', '64', '128',
                            '--infer-batch', '128'])
    got = [(c.compile_mode, c.mode, c.batch, c.target == other)
           for c in tool.cases_of(args)]
    assert got[:6] == [
        (None, 'infer', 128, False), (None, 'infer', 128, True),
        (None, 'train', 64, False), (None, 'train', 128, False),
        (None, 'train', 64, True), (None, 'train', 128, True)]
    assert len(got) == 12
    assert {g[0] for g in got[6:]} == {'reduce-overhead'}


def test_in_process_run_writes_records(mini_config, tmp_path):
    """Two configs, train and infer, eager: one JSON record each with the
    fields of docs/results/, and a profiled step."""
    out = tmp_path / 'r.jsonl'
    tool = _tool()
    tool.main([mini_config, '--in-process', '--device', 'cpu',
               '--infer-batch', '1', '--train-batch', '1', '--warmup', '1',
               '--repeats', '1', '--rounds', '2', '--threads', '1',
               '--json', '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['mode'] for r in rows] == ['infer', 'train']
    for r in rows:
        for key in ('model', 'mode', 'compiled', 'batch', 'img_s',
                    'peak_mb', 'device', 'torch', 'date',
                    'kernels_per_step', 'busy_fraction'):
            assert key in r, key
        assert r['model'] == 'mini' and r['compiled'] is False
        assert r['img_s'] > 0 and r['kernels_per_step'] > 0
        assert r['graphs_compiled'] == 0 == r['recompiles_while_timed']
        assert r['device'].startswith('cpu')
