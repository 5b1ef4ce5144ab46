"""benchmarks/gpu_check.py: its logic on the CPU (``--device cpu
--dry-run``), so the GPU run is known to work before a device is spent on
it."""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(REPO, 'benchmarks', 'gpu_check.py')


def _module():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(stage, config, mode, img_s, batch=64, compile_mode=None, **kw):
    return dict(stage=stage, config=config, mode=mode, img_s=img_s,
                batch=batch, compile_mode=compile_mode, **kw)


def test_summary_compares_biformer_with_swin():
    gc = _module()
    recs = [
        _rec('classification', 'mmpretrain::swin/x.py', 'train', 100.0,
             peak_mb=1000.0),
        _rec('classification', 'configs/biformer_s.py', 'train', 110.0,
             peak_mb=1200.0),
        _rec('classification', 'swin', 'infer', 300.0, batch=128),
        _rec('classification', 'biformer', 'infer', 330.0, batch=128),
        _rec('compiled', 'swin', 'train', 150.0, compile_mode='max-autotune',
             busy_fraction=0.97),
        _rec('compiled', 'biformer', 'train', 140.0,
             compile_mode='max-autotune', busy_fraction=0.85),
        _rec('detection', 'mmdet::swin/mask-rcnn.py', 'train', 10.0,
             batch=2, peak_mb=9000.0),
        _rec('detection', 'maskrcnn_biformer_s.py', 'train', 11.0, batch=2,
             peak_mb=8000.0),
        _rec('classification', 'biformer', 'train', 50.0, batch=128),
        dict(stage='check', ok=True),
    ]
    rows = {(r['measured'], r['mode'], r['batch']): r
            for r in gc.summarize(recs)}
    assert len(rows) == 4  # b128 training has no Swin-T partner
    train = rows[('classification', 'train', 64)]
    assert train['speed_ratio'] == 1.1 and train['speed_ok']
    assert train['memory_ratio'] == 1.2 and 'memory_ok' not in train
    infer = rows[('classification', 'infer', 128)]
    assert infer['speed_target'] == 1.2 and not infer['speed_ok']
    comp = rows[('compiled', 'train', 64)]
    assert comp['busy_ok'] is False and not comp['speed_ok']
    det = rows[('detection', 'train', 2)]
    assert det['speed_ok'] and det['memory_ok']


def _mini_configs(tmp_path):
    sys.path.insert(0, osp.join(REPO, 'tests'))
    from mini_arch import MINI
    base = osp.join(REPO, 'configs', 'classification', 'biformer_t_in1k.py')
    paths = []
    for name in ('swin_mini', 'biformer_mini'):
        path = tmp_path / f'{name}.py'
        path.write_text(
            f'_base_ = [{base!r}]\n'
            f'model = dict(backbone=dict(arch=dict(_delete_=True, '
            f"**{MINI!r}), attn_backend='torch'), "
            'head=dict(in_channels=256))\n')
        paths.append(str(path))
    return paths


def test_dry_run_on_the_cpu(tmp_path):
    """The check stage (Triton under the interpreter, flex forward, the
    compiled operator, the deterministic backward) and the interleaved
    benchmark with two mini models standing in for Swin-T and BiFormer-S;
    then the summary."""
    out = tmp_path / 'r.jsonl'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--device', 'cpu', '--dry-run', '--stages',
         'check', 'classification', '--cls-configs',
         *_mini_configs(tmp_path), '--out', str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    checks = [r for r in recs if r['stage'] == 'check']
    assert {(r['check'], r.get('backend')) for r in checks} == {
        ('bra', 'triton'), ('bra', 'flex'), ('bra', 'torch'),
        ('bra compiled', 'triton'), ('deterministic backward', 'triton')}
    assert all(r['ok'] for r in checks)
    bench = [r for r in recs if r['stage'] == 'classification'
             and 'img_s' in r]
    assert sorted((r['model'], r['mode']) for r in bench) == [
        ('biformer_mini', 'infer'), ('biformer_mini', 'train'),
        ('swin_mini', 'infer'), ('swin_mini', 'train')]
    for r in recs:
        assert r['device'].startswith('cpu') and r['torch'] and r['date']
    summary = [r for r in recs if r['stage'] == 'summary']
    assert {r['mode'] for r in summary} == {'infer', 'train'}
    assert all(r['speed_ratio'] > 0 for r in summary)
