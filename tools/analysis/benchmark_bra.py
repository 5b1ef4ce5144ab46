"""Benchmark the backends of bi-level routing attention (BRA).

For every shape and backend, in a fresh subprocess per backend:

* ``fwd_ms``: forward time (``torch.no_grad``), best of ``--repeat`` runs
  after one warm-up (the best, not the median, because the CPU may be
  shared with other work);
* ``fwd_bwd_ms``: forward + backward time (best of ``--repeat``);
* ``peak_mem_mb``: peak memory of one forward + backward above what was
  allocated before it. CPU: the process's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the step;
  without that, ``ru_maxrss`` minus the RSS before the first step). CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the step;
* ``max_abs_err``: max |backend - reference| of the output and of the input
  gradient on a reduced copy (batch 1, a ``3*n_win - 1`` square map, same
  layer and weights), since the dense ``reference`` does not fit at full
  size.

``--dtype bfloat16`` / ``float16`` runs the layer (weights and input) in
that dtype, as under mixed precision on a GPU; the reference then runs in
the same dtype.

By default the whole BRA layer is timed (``BiLevelRoutingAttention``: qkv
projection, routing, attention, LePE, output projection, ``auto_pad``), as
in a training step; ``--op core`` times the attention (``bra``) alone on the
layer's q/k/v and routing. Every row names the implementation ``auto``
chose (``impl``), the CPU model and torch's capability level
(``ATEN_CPU_CAPABILITY=avx2`` forces a lower one, the C++ kernels then
built for it).

Presets (BiFormer-S stages 1-3: dims 64/128/256, heads 2/4/8, topk 1/4/16,
maps at 1/4, 1/8, 1/16 of the image):

* ``cls``: 224x224, n_win 7, batch 32
* ``det``: 800x1216, n_win 16, batch 2
* ``seg``: 512x512, n_win 8, batch 4

Custom shapes: ``--shape NAME=BATCH,H,W,DIM,HEADS,N_WIN,TOPK`` (H, W: the
feature map).

Examples::

    python tools/analysis/benchmark_bra.py --preset cls det seg
    python tools/analysis/benchmark_bra.py --preset det --json
    python tools/analysis/benchmark_bra.py --shape s=2,56,56,64,2,7,1 \\
        --backends official torch
    ATEN_CPU_CAPABILITY=avx2 python tools/analysis/benchmark_bra.py \\
        --preset cls det --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

from mmbiformer.analysis.memory import proc_status_kb, reset_peak_rss

STAGES = ((64, 2, 1, 4), (128, 4, 4, 8), (256, 8, 16, 16))
PRESETS = {
    'cls': dict(img=(224, 224), n_win=7, batch=32),
    'det': dict(img=(800, 1216), n_win=16, batch=2),
    'seg': dict(img=(512, 512), n_win=8, batch=4),
}
KEYS = ('shape', 'backend', 'impl', 'device', 'fwd_ms', 'fwd_bwd_ms',
        'peak_mem_mb', 'max_abs_err')


def preset_shapes(name: str) -> List[Dict]:
    p = PRESETS[name]
    shapes = []
    for i, (dim, heads, topk, stride) in enumerate(STAGES, 1):
        h, w = p['img'][0] // stride, p['img'][1] // stride
        shapes.append(dict(name=f'{name}-s{i}', batch=p['batch'], h=h, w=w,
                           dim=dim, heads=heads, n_win=p['n_win'],
                           topk=topk))
    return shapes


def parse_shape(text: str) -> Dict:
    try:
        name, vals = text.split('=')
        b, h, w, dim, heads, n_win, topk = (int(x) for x in vals.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--shape {text!r}: expected NAME=BATCH,H,W,DIM,HEADS,N_WIN,TOPK'
            ', e.g. s1=2,56,56,64,2,7,1') from None
    return dict(name=name, batch=b, h=h, w=w, dim=dim, heads=heads,
                n_win=n_win, topk=topk)


# ----------------------------------------------------------------- worker


def _limit_memory(limit_gb: float) -> None:
    """Cap the address space at the current size plus ``limit_gb``."""
    vm = proc_status_kb('VmSize')
    if vm is None or limit_gb <= 0:
        return
    cap = vm * 1024 + int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def worker(spec: Dict) -> Dict:
    import torch

    from mmbiformer.analysis.benchmark import cpu_model
    from mmbiformer.ops import (
        BiLevelRoutingAttention,
        bra,
        cpu_ext,
        implementation,
    )
    from mmbiformer.ops.routing import region_graph

    device = torch.device(spec['device'])
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    if device.type == 'cpu':
        _limit_memory(spec['mem_limit_gb'])
    torch.manual_seed(0)
    backend = spec['backend']
    dtype = getattr(torch, spec.get('dtype', 'float32'))
    layer = BiLevelRoutingAttention(
        spec['dim'], num_heads=spec['heads'], n_win=spec['n_win'],
        topk=spec['topk'], auto_pad=True, backend=backend).to(device, dtype)
    res = dict(shape=spec['name'], backend=backend, impl=None,
               device=str(device), dtype=str(dtype).split('.')[-1],
               fwd_ms=None, fwd_bwd_ms=None, peak_mem_mb=None,
               max_abs_err=None, status='ok', op=spec['op'],
               cpu=cpu_model() if device.type == 'cpu' else None,
               capability=cpu_ext.capability(),
               omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'),
               threads=torch.get_num_threads())

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def make_step(batch: int, h: int, w: int):
        """Returns (x, fn) where fn(x) is the timed forward."""
        x = torch.randn(batch, h, w, spec['dim'], device=device,
                        dtype=dtype)
        if spec['op'] == 'layer':
            return x, layer
        # core only: q/k/v and routing of the layer computed once, outside
        nw = spec['n_win']
        hp, wp = -(-h // nw) * nw, -(-w // nw) * nw
        with torch.no_grad():
            qkv = layer.qkv.qkv(torch.nn.functional.pad(
                x, (0, 0, 0, wp - w, 0, hp - h)))
            q, k, _ = qkv.split([layer.qk_dim, layer.qk_dim, layer.dim], -1)
            graph = region_graph(q, k, nw, layer.topk, layer.scale)
        sizes = [layer.qk_dim, layer.qk_dim, layer.dim]

        def core(z):
            qq, kk, vv = z.split(sizes, dim=-1)
            return bra(qq, kk, vv, graph, layer.num_heads, layer.scale,
                       layer.backend)
        return qkv.detach(), core

    try:
        x, fn = make_step(spec['batch'], spec['h'], spec['w'])
        if backend in ('auto', 'cpu', 'triton', 'torch'):
            probe = torch.empty(1, 1, 1, layer.dim, device=device,
                                dtype=dtype)
            impl = implementation('cpu' if device.type == 'cpu' else 'cuda',
                                  backend, probe, probe, spec['heads'], None)
            res['impl'] = impl.__name__.rsplit('.', 1)[-1]
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            g = torch.randn_like(fn(x))
        sync()
        # peak memory of one forward + backward (also the warm-up)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset = reset_peak_rss()
            base = proc_status_kb('VmRSS') or 0
        fn(xg).backward(g)
        sync()
        if device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated() - base
            res['peak_mem_mb'] = round(peak / 2**20, 1)
        else:
            hwm = proc_status_kb('VmHWM') if reset else resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss
            res['peak_mem_mb'] = round((hwm - base) / 1024, 1)
        times = []
        for _ in range(spec['repeat']):
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            fn(xg).backward(g)
            sync()
            times.append(time.perf_counter() - t0)
        res['fwd_bwd_ms'] = round(1e3 * min(times), 1)
        del xg
        times = []
        with torch.no_grad():
            fn(x)
            for _ in range(spec['repeat']):
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                times.append(time.perf_counter() - t0)
        res['fwd_ms'] = round(1e3 * min(times), 1)
    except (RuntimeError, MemoryError) as e:
        msg = str(e).lower()
        cap = spec['mem_limit_gb']
        res['status'] = ((f'oom (> {cap:g} GB cap)' if cap > 0 else 'oom')
                         if 'memory' in msg or 'alloc' in msg else
                         'error: ' + str(e).splitlines()[0][:200])
    # accuracy on a reduced copy (fits the dense reference)
    try:
        side = 3 * spec['n_win'] - 1
        xs, fn = make_step(1, side, side)
        outs = []
        for b in (backend, 'reference'):
            layer.backend = b
            xr = xs.clone().requires_grad_()
            y = fn(xr)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xr.grad))
        layer.backend = backend
        res['max_abs_err'] = float(max(
            (a - e).abs().max().item() for a, e in zip(*outs)))
    except (RuntimeError, MemoryError) as e:
        res['max_abs_err'] = None
        res.setdefault('err_status', str(e).splitlines()[0][:200])
    return res


# ----------------------------------------------------------------- driver


def run_one(spec: Dict, timeout: int) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker',
           json.dumps(spec)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
    # On a shared CPU, spinning OpenMP threads wait for a descheduled peer
    # in every parallel region; the many small parallel ops of a backend
    # then cost several times their work. Passive waiting (unless the
    # caller chose a policy) keeps the comparison about the backends.
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    base = {k: None for k in KEYS}
    base.update(shape=spec['name'], backend=spec['backend'],
                device=spec['device'])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(base, status=f'timeout ({timeout} s)')
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{'):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    status = 'oom' if proc.returncode in (-9, 137) else f'failed: {tail}'
    return dict(base, status=status[:200])


def run_in_process(spec: Dict) -> Dict:
    """:func:`worker` in this process; CUDA memory is released after it."""
    import gc

    import torch
    try:
        return worker(spec)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def merge(a: Dict, b: Dict) -> Dict:
    """Best of two runs of one (shape, backend): the lowest of each
    number among the runs that completed."""
    if b.get('status') != 'ok':
        return a
    if a.get('status') != 'ok':
        return b
    out = dict(a)
    for key in ('fwd_ms', 'fwd_bwd_ms', 'peak_mem_mb'):
        vals = [x for x in (a.get(key), b.get(key)) if x is not None]
        out[key] = min(vals) if vals else None
    return out


def fmt(v, nd=1) -> str:
    if v is None:
        return '-'
    if isinstance(v, float) and v != 0 and abs(v) < 1e-2:
        return f'{v:.1e}'
    return f'{v:.{nd}f}' if isinstance(v, float) else str(v)


def print_table(rows: List[Dict]) -> None:
    head = ('shape', 'backend', 'impl', 'fwd ms', 'fwd+bwd ms', 'peak MB',
            'max abs err', 'status')
    lines = [head]
    for r in rows:
        lines.append((r['shape'], r['backend'], r.get('impl') or '-',
                      fmt(r['fwd_ms']),
                      fmt(r['fwd_bwd_ms']), fmt(r['peak_mem_mb'], 0),
                      fmt(r['max_abs_err']), r.get('status', '')))
    widths = [max(len(str(row[i])) for row in lines)
              for i in range(len(head))]
    for i, row in enumerate(lines):
        print('  '.join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print('  '.join('-' * w for w in widths))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', nargs='*', default=[],
                        choices=sorted(PRESETS))
    parser.add_argument('--shape', nargs='*', type=parse_shape, default=[],
                        help='NAME=BATCH,H,W,DIM,HEADS,N_WIN,TOPK')
    parser.add_argument('--stages', nargs='*', type=int, default=[1, 2, 3],
                        help='preset stages to run (default: 1 2 3)')
    parser.add_argument('--backends', nargs='*',
                        default=None, help='default: auto official torch '
                        '(+ triton on CUDA, + cpu on the CPU)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--op', default='layer', choices=['layer', 'core'])
    parser.add_argument('--dtype', default='float32',
                        choices=['float32', 'bfloat16', 'float16'],
                        help='dtype of the layer and its input (max abs err '
                        'is then against the reference in the same dtype)')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=1,
                        help='run all (shape, backend) processes this many '
                        'times, interleaved, and keep the best of each '
                        'number (steadier on a shared machine)')
    parser.add_argument('--threads', type=int, default=0,
                        help='CPU threads per process (0: torch default)')
    parser.add_argument('--timeout', type=int, default=600,
                        help='seconds per (shape, backend) process')
    parser.add_argument('--mem-limit-gb', type=float, default=8.0,
                        help='CPU: address-space cap per process above its '
                        'size after start-up; a backend that needs more is '
                        'reported as "oom" (0: no cap)')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object per (shape, backend)')
    parser.add_argument('--in-process', action='store_true',
                        help='CUDA: measure every (shape, backend) in this '
                        'process, one after the other (no start-up per '
                        'measurement; peak memory stays per measurement '
                        'through torch.cuda.reset_peak_memory_stats)')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    shapes = [s for p in args.preset for s in preset_shapes(p)
              if int(s['name'][-1]) in args.stages] + list(args.shape)
    if not shapes:
        parser.error('give --preset and/or --shape')
    if args.in_process and args.device != 'cuda':
        parser.error('--in-process needs --device cuda (CPU peak memory is '
                     'a per-process high-water mark)')
    backends = args.backends or (
        ['auto', 'official', 'torch'] +
        (['triton'] if args.device == 'cuda' else ['cpu']))
    best: Dict = {}
    order = []
    for rnd in range(args.rounds):
        for shape in shapes:
            for backend in backends:
                spec = dict(shape, backend=backend, device=args.device,
                            op=args.op, repeat=args.repeat, dtype=args.dtype,
                            threads=args.threads,
                            mem_limit_gb=args.mem_limit_gb)
                row = (run_in_process(spec) if args.in_process else
                       run_one(spec, args.timeout))
                key = (shape['name'], backend)
                if key not in best:
                    order.append(key)
                    best[key] = row
                else:
                    best[key] = merge(best[key], row)
                print(f"# round {rnd + 1}: {row['shape']} {row['backend']}"
                      f": {row.get('status')}", file=sys.stderr, flush=True)
    rows = [dict(best[k], rounds=args.rounds) for k in order]
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    if not args.json:
        print_table(rows)


if __name__ == '__main__':
    main()
