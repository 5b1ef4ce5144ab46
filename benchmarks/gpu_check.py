"""The GPU check of BiFormer's speed work: one command, under 8 minutes on
one H100/H200, JSON lines out.

    python benchmarks/gpu_check.py            # writes docs/results/*.jsonl

Stages, in order of priority; each runs only if the time budget
(``--budget``, seconds) leaves room, and a stage that does not fit or fails
is recorded as such:

1. ``check``: the attention on the GPU against the CPU reference (dense
   ``reference`` backend in float64 on the CPU, same inputs and routing):
   outputs and q/k/v gradients of ``triton`` (the CUDA default), ``flex``
   and ``torch`` at BiFormer-S's stage shapes, float32 and bfloat16
   (relative max errors; tolerances :data:`TOL`); ``triton`` compiled by
   inductor (its kernels inside the graph); the deterministic backward bit
   for bit twice.
2. ``classification``: ``tools/analysis/benchmark.py --in-process``:
   Swin-T and BiFormer-S interleaved, eager, bf16 autocast, AdamW fused,
   inference b128, training b64 and b128; img/s, peak MB, kernels per step,
   GPU-busy fraction.
3. ``detection``: Mask R-CNN 1x training step, 2 images of 800x1333,
   BiFormer-S against Swin-T, eager: time and peak memory.
4. ``compiled``: training b64 compiled with ``--compile-mode`` (default
   ``reduce-overhead``: CUDA graphs; ``max-autotune`` adds GEMM
   autotuning, several minutes per model).
5. ``op``: ``tools/analysis/benchmark_bra.py``: the BRA layer at the
   ``cls`` and ``det`` shapes, ``torch``, ``triton`` and ``flex``, bf16.
6. ``compiled-infer``: inference b128, compiled likewise.
7. ``pytest``: the GPU tests of tests/ops (Triton, its operators, flex).

Then ``summary``: BiFormer-S against Swin-T for every (mode, compiled,
batch) and the targets of the issue (training >= 1.0x, inference >= 1.2x,
compiled training GPU-busy >= 90 %, detection time and peak memory <=
Swin-T's).

``--device cpu --dry-run`` runs the same logic on the CPU at tiny sizes
(Triton under its interpreter, FlexAttention forward only), so the script is
known to work before a device is spent on it (tests/tools/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SWIN = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'
BIFORMER = 'configs/classification/biformer_s_in1k.py'
SWIN_DET = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'
BIFORMER_DET = 'configs/detection/maskrcnn_biformer_s_coco.py'
#: relative max error (max |got - ref| / max |ref|) allowed per dtype
TOL = {'float32': 1e-4, 'bfloat16': 3e-2, 'float16': 5e-3}
#: (name, n, heads, n_win, rh, rw, topk, d, dv): BiFormer-S's routed
#: stages at 224 (batch 8) and stage 1 at 800x1216 (padded regions)
SHAPES = [
    ('cls-s1', 8, 2, 7, 8, 8, 1, 32, 32),
    ('cls-s2', 8, 4, 7, 4, 4, 4, 32, 32),
    ('cls-s3', 8, 8, 7, 2, 2, 16, 32, 32),
    ('det-s1', 1, 2, 16, 13, 19, 1, 32, 32),
]
TINY_SHAPES = [('tiny', 1, 2, 2, 2, 3, 2, 16, 16)]
#: the (shape, dtype) pairs FlexAttention is checked at (it compiles for
#: every new shape and dtype, 10-30 s each)
FLEX_CHECKS = {('cls-s1', 'float32'), ('cls-s1', 'bfloat16'),
               ('det-s1', 'bfloat16')}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--dry-run', action='store_true',
                   help='tiny sizes, one iteration each (with --device cpu: '
                   'the script logic without a GPU)')
    p.add_argument('--budget', type=float, default=450,
                   help='seconds for all stages (default 450)')
    p.add_argument('--stages', nargs='+',
                   default=['check', 'classification', 'detection',
                            'compiled', 'op', 'compiled-infer', 'pytest'])
    p.add_argument('--compile-mode', default='reduce-overhead')
    p.add_argument('--cls-configs', nargs=2, default=[SWIN, BIFORMER],
                   metavar=('SWIN', 'BIFORMER'))
    p.add_argument('--det-configs', nargs=2, default=[SWIN_DET, BIFORMER_DET],
                   metavar=('SWIN', 'BIFORMER'))
    p.add_argument('--out', default=None,
                   help='JSON lines file (default: docs/results/'
                   'gpu_check-DATE-DEVICE.jsonl)')
    return p.parse_args(argv)


class Run:
    """The output file, the clock and the common fields of the records."""

    def __init__(self, args):
        import torch

        from mmbiformer.analysis.interleaved import device_info
        self.args = args
        self.start = time.monotonic()
        self.info = device_info(torch.device(args.device))
        if args.out is None:
            slug = re.sub(r'[^a-z0-9]+', '-', self.info['device'].lower())
            args.out = osp.join(ROOT, 'docs', 'results', f"gpu_check-"
                                f"{self.info['date']}-{slug.strip('-')}"
                                '.jsonl')
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        self.records = []

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.start)

    def write(self, **rec) -> dict:
        rec = dict(rec)
        for k, v in self.info.items():
            rec.setdefault(k, v)
        self.records.append(rec)
        with open(self.args.out, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        return rec

    def log(self, msg: str) -> None:
        print(f'[gpu_check {time.monotonic() - self.start:5.0f} s] {msg}',
              flush=True)


# ------------------------------------------------------------ 1. check

def _rel(a, e) -> float:
    scale = e.abs().max().item() or 1.0
    return (a.double() - e).abs().max().item() / scale


def _judge(ref, dtype: str, compute, *args, **kwargs):
    """``(errs, ok, status)`` of ``compute(*args, **kwargs)``'s tensors
    against ``ref`` (relative errors within ``TOL[dtype]``); an exception
    is recorded in the status, not raised."""
    try:
        errs = [_rel(a.cpu(), e)
                for a, e in zip(compute(*args, **kwargs), ref)]
    except Exception as exc:  # noqa: BLE001 (recorded)
        return [], False, f'failed: {type(exc).__name__}: {exc}'[:300]
    ok = all(e <= TOL[dtype] for e in errs)
    return errs, ok, 'ok' if ok else 'error above tolerance'


def _make(shape, seed=0):
    import torch

    from mmbiformer.ops import RegionGraph
    _, n, heads, nw, rh, rw, topk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    h, w = nw * rh, nw * rw
    q = torch.randn(n, h, w, heads * d, generator=g)
    k = torch.randn(n, h, w, heads * d, generator=g)
    v = torch.randn(n, h, w, heads * dv, generator=g)
    r = nw * nw
    idx = torch.rand(n, r, r, generator=g).topk(topk, dim=-1).indices
    grad = torch.randn(n, h, w, heads * dv, generator=g)
    return (q, k, v), RegionGraph(idx, nw), grad


def _fwd_bwd(maps, graph, heads, backend, grad, fn=None, grads=True):
    from mmbiformer.ops import bra
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in maps)
    if fn is None:
        out = bra(q, k, v, graph, heads, scale=0.25, backend=backend)
    else:
        out = fn(q, k, v, graph.topk_index)
    if not grads:
        return [out]
    out.backward(grad.to(out.dtype))
    return [out, q.grad, k.grad, v.grad]


def _oracle(q) -> str:
    """The CPU float64 oracle: the dense ``reference`` where its ``L x L``
    scores fit, else the portable ``torch`` implementation (which the
    tests hold equal to ``reference``)."""
    return 'reference' if q.shape[1] * q.shape[2] <= 4096 else 'torch'


def stage_check(run: Run) -> None:
    import torch

    from mmbiformer.ops import RegionGraph, bra
    dev = run.args.device
    cpu_only = dev == 'cpu'
    shapes = TINY_SHAPES if run.args.dry_run else SHAPES
    dtypes = ['float32'] if run.args.dry_run else ['float32', 'bfloat16']
    for shape in shapes:
        maps, graph, grad = _make(shape)
        heads = shape[2]
        oracle = _oracle(maps[0])
        ref = _fwd_bwd([t.double() for t in maps], graph, heads, oracle,
                       grad.double())
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            on = [t.to(dev, dt) for t in maps]
            g_on = RegionGraph(graph.topk_index.to(dev), graph.n_win)
            for backend in ('triton', 'flex', 'torch'):
                if backend == 'flex' and (shape[0], dtype) not in FLEX_CHECKS \
                        and not run.args.dry_run:
                    continue  # each shape and dtype compiles anew
                # FlexAttention has no backward on the CPU
                grads = not (cpu_only and backend == 'flex')
                errs, ok, status = _judge(
                    ref, dtype, _fwd_bwd, on, g_on, heads, backend,
                    grad.to(dev), grads=grads)
                names = ['out', 'dq', 'dk', 'dv'][:len(errs)]
                run.write(stage='check', check='bra', shape=shape[0],
                          backend=backend, dtype=dtype, ok=ok, oracle=oracle,
                          status=status, tol=TOL[dtype],
                          **{f'{n}_rel_err': e for n, e in
                             zip(names, errs)})
                run.log(f'check {shape[0]} {backend} {dtype}: {status}')

    # inductor with the Triton kernels in its graph, against the reference
    shape = shapes[0] if run.args.dry_run else SHAPES[1]
    maps, graph, grad = _make(shape)
    heads, nw = shape[2], shape[3]
    ref = _fwd_bwd([t.double() for t in maps], graph, heads, 'reference',
                   grad.double())

    def f(q, k, v, idx):
        return bra(q, k, v, RegionGraph(idx, nw), heads, scale=0.25,
                   backend='triton')

    for dtype in dtypes:
        dt = getattr(torch, dtype)
        backend = 'aot_eager' if cpu_only else 'inductor'
        torch._dynamo.reset()
        fn = torch.compile(f, backend=backend, fullgraph=True)  # lazy
        g_on = RegionGraph(graph.topk_index.to(dev), nw)
        errs, ok, status = _judge(ref, dtype, _fwd_bwd,
                                  [t.to(dev, dt) for t in maps], g_on, heads,
                                  None, grad.to(dev), fn=fn)
        run.write(stage='check', check='bra compiled', shape=shape[0],
                  backend='triton', compiler=backend, dtype=dtype, ok=ok,
                  status=status, tol=TOL[dtype],
                  **{f'{n}_rel_err': e for n, e in
                     zip(['out', 'dq', 'dk', 'dv'], errs)})
        run.log(f'check compiled {shape[0]} {dtype}: {status}')

    # deterministic backward: bit for bit, twice
    shape = shapes[0] if run.args.dry_run else SHAPES[2]
    maps, graph, grad = _make(shape)
    on = [t.to(dev) for t in maps]
    g_on = RegionGraph(graph.topk_index.to(dev), graph.n_win)
    state = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_fwd_bwd(on, g_on, shape[2], 'triton', grad.to(dev))
                for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        status = 'ok' if same else 'gradients differ between runs'
    except Exception as exc:  # noqa: BLE001 (recorded)
        same, status = False, f'failed: {type(exc).__name__}: {exc}'[:300]
    finally:
        torch.use_deterministic_algorithms(state)
    run.write(stage='check', check='deterministic backward', shape=shape[0],
              backend='triton', ok=same, status=status)
    run.log(f'check deterministic: {status}')


# ---------------------------------------------------- 2.-6. subprocesses

def _subprocess(run: Run, stage: str, cmd, cap: float):
    """Runs ``cmd`` with the time left (at most ``cap`` s); records the
    stage's status; returns its stdout or None."""
    timeout = min(cap, run.left())
    if timeout < 20:
        run.write(stage=stage, status='skipped: no time left')
        run.log(f'{stage}: skipped (no time left)')
        return None
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    run.log(f'{stage}: {" ".join(cmd[1:])} (up to {timeout:.0f} s)')
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        run.write(stage=stage, status=f'timeout after {timeout:.0f} s')
        out = exc.stdout or ''
        return out.decode() if isinstance(out, bytes) else out
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        tail = '\n'.join((proc.stdout + proc.stderr).splitlines()[-8:])
        run.write(stage=stage, status=f'failed (rc {proc.returncode})',
                  seconds=secs, tail=tail[-1500:])
        run.log(f'{stage}: failed\n{tail}')
        return proc.stdout
    run.write(stage=stage, status='ok', seconds=secs)
    return proc.stdout


def _missing(*modules):
    """The first of ``modules`` that cannot be imported here, else None
    (checked without importing the heavy ones)."""
    import importlib.util
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:  # a parent package is missing
            return name
    return None


#: what the whole-model stages import: the classification benchmark builds
#: mmpretrain models (mmcv's Python part is enough: mmcv-lite), Mask R-CNN
#: needs mmdet and mmcv's compiled ops
NEEDS = {
    'classification': ('mmengine', 'mmcv', 'mmpretrain'),
    'detection': ('mmengine', 'mmcv', 'mmdet', 'mmcv._ext'),
}
# (mmcv._ext: mmcv's compiled ops, or benchmarks/mmcv_ext_torchvision.py
# copied in as mmcv/_ext.py next to mmcv-lite)


def _json_lines(text):
    for line in (text or '').splitlines():
        if line.startswith('{'):
            try:
                yield json.loads(line)
            except ValueError:
                pass


def stage_pytest(run: Run) -> None:
    if run.args.dry_run:
        run.write(stage='pytest', status='skipped: dry run')
        return
    out = _subprocess(run, 'pytest', [
        sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
        'tests/ops/test_triton.py', 'tests/ops/test_triton_op.py',
        'tests/ops/test_flex.py'], 180)
    summary = (out or '').strip().splitlines()[-1:] or ['']
    run.write(stage='pytest', summary=summary[0])
    run.log(f'pytest: {summary[0]}')


def _bench(run: Run, stage: str, configs, extra, cap: float) -> None:
    a = run.args
    missing = _missing(*NEEDS['detection' if stage == 'detection'
                             else 'classification'])
    if missing:
        run.write(stage=stage, status=f'skipped: {missing} is not installed '
                  '(see benchmarks/gpu_wheels.sh)')
        run.log(f'{stage}: skipped, no {missing}')
        return
    dry = ['--warmup', '1', '--repeats', '1', '--rounds', '1',
           '--infer-batch', '1', '--train-batches', '1', '--det-batch', '1',
           '--det-size', '96', '128', '--threads', '1'] if a.dry_run else [
        '--warmup', '3', '--repeats', '10', '--rounds', '2']
    cmd = [sys.executable, 'tools/analysis/benchmark.py', *configs,
           '--in-process', '--device', a.device, '--optimizer',
           'adamw-fused' if a.device == 'cuda' else 'adamw', '--json',
           *(['--amp', 'bf16'] if a.device == 'cuda' else []), *extra, *dry]
    fields = {}
    if stage == 'detection':  # whose NMS and RoIAlign kernels ran
        fields['mmcv_ops'] = _mmcv_ops()
    for rec in _json_lines(_subprocess(run, stage, cmd, cap)):
        run.write(stage=stage, **rec, **fields)


def _mmcv_ops():
    """``'mmcv'`` (its compiled ops), ``'torchvision'`` (the stand-in of
    benchmarks/mmcv_ext_torchvision.py) or None."""
    try:
        import mmcv._ext as ext
    except Exception:  # noqa: BLE001 (any failure means: not usable)
        return None
    return getattr(ext, 'SOURCE', 'mmcv')


def stage_classification(run: Run) -> None:
    extra = ['--modes', 'infer', 'train']
    if not run.args.dry_run:
        extra += ['--infer-batch', '128', '--train-batches', '64', '128']
    _bench(run, 'classification', run.args.cls_configs, extra, 150)


def stage_detection(run: Run) -> None:
    _bench(run, 'detection', run.args.det_configs, ['--modes', 'train'], 120)


def stage_compiled(run: Run, mode: str = 'train') -> None:
    extra = ['--modes', mode, '--compile-modes', run.args.compile_mode]
    if not run.args.dry_run:
        extra += ['--infer-batch', '128', '--train-batches', '64']
    _bench(run, 'compiled', run.args.cls_configs, extra, 240)


def stage_op(run: Run) -> None:
    """The layer's forward + backward per backend; FlexAttention (compiled
    per shape, the slowest to start) in a second call."""
    a = run.args
    for backends, cap in ((['torch', 'triton'], 90), (['flex'], 120)):
        cmd = [sys.executable, 'tools/analysis/benchmark_bra.py',
               '--device', a.device, '--json', '--backends', *backends]
        if a.dry_run:
            cmd += ['--shape', 'tiny=1,8,12,32,2,2,2', '--repeat', '1']
        else:
            cmd += ['--in-process', '--preset', 'cls', 'det', '--dtype',
                    'bfloat16', '--repeat', '5']
        for rec in _json_lines(_subprocess(run, 'op', cmd, cap)):
            run.write(stage='op', **dict(rec, device=run.info['device'],
                                         on=rec.get('device')))


# ------------------------------------------------------------- summary

def summarize(records):
    """BiFormer-S against Swin-T per (stage, mode, compiled, batch) and the
    targets of the issue; ``None`` where a figure is missing."""
    def key(r):
        return (r['stage'], r['mode'], r.get('compile_mode'), r['batch'])

    rows = [r for r in records if r.get('stage') in (
        'classification', 'compiled', 'detection') and 'img_s' in r]
    pairs = {}
    for r in rows:
        kind = 'swin' if 'swin' in r['config'].lower() else 'biformer'
        pairs.setdefault(key(r), {})[kind] = r
    out = []
    for (stage, mode, cmode, batch), p in pairs.items():
        if len(p) < 2:
            continue
        b, s = p['biformer'], p['swin']
        ratio = b['img_s'] / s['img_s']
        target = 1.2 if mode == 'infer' else 1.0
        row = dict(measured=stage, mode=mode, compile_mode=cmode,
                   batch=batch,
                   speed_ratio=ratio, speed_target=target,
                   speed_ok=ratio >= target,
                   biformer_busy=b.get('busy_fraction'),
                   swin_busy=s.get('busy_fraction'))
        if b.get('peak_mb') is not None and s.get('peak_mb') is not None:
            row['memory_ratio'] = b['peak_mb'] / s['peak_mb']
            if stage == 'detection':
                row['memory_ok'] = row['memory_ratio'] <= 1.0
        if cmode and mode == 'train' and b.get('busy_fraction') is not None:
            row['busy_ok'] = b['busy_fraction'] >= 0.9
        out.append(row)
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cpu':
        # the Triton kernels under the interpreter (before triton loads)
        os.environ.setdefault('TRITON_INTERPRET', '1')
    sys.path.insert(0, ROOT)
    run = Run(args)
    run.log(f"{run.info['device']}, torch {run.info['torch']}, driver "
            f"{run.info['driver']}, writing {args.out}")
    stages = dict(check=stage_check, pytest=stage_pytest,
                  classification=stage_classification,
                  detection=stage_detection, op=stage_op,
                  compiled=stage_compiled,
                  **{'compiled-infer': lambda r: stage_compiled(r, 'infer')})
    for name in args.stages:
        if run.left() < 20:
            run.write(stage=name, status='skipped: no time left')
            continue
        try:
            stages[name](run)
        except Exception as exc:  # noqa: BLE001 (recorded, next stage)
            run.write(stage=name, status=f'failed: {type(exc).__name__}: '
                      f'{exc}'[:300])
            run.log(f'{name}: failed: {exc}')
    for row in summarize(run.records):
        run.write(stage='summary', **row)
        run.log('summary: ' + json.dumps(row))
    run.log(f'done in {time.monotonic() - run.start:.0f} s: {args.out}')
    checks = [r for r in run.records if r.get('stage') == 'check']
    return 0 if checks and all(r.get('ok') for r in checks) else 1


if __name__ == '__main__':
    sys.exit(main())
