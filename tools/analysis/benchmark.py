"""Throughput (images/s) and peak memory of whole models, side by side.

Each config and mode runs in a fresh process, so peak memory is its own.
A config may carry overrides after ``@``, e.g.
``configs/classification/biformer_s_in1k.py@model.backbone.attn_backend=official``.

Example (the comparison in docs/benchmarks.md)::

    S=configs/classification/biformer_s_in1k.py
    python tools/analysis/benchmark.py \\
        mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py \\
        $S $S@model.backbone.attn_backend=official \\
        --threads 2 --infer-batch 16 --train-batch 8 --rounds 3

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets
a policy.

``--in-process`` measures every config in this one process instead,
interleaved round by round (:mod:`mmbiformer.analysis.interleaved`), eager
and under each ``--compile-modes`` entry, and profiles one step of each:
kernels per step and the device's busy fraction. Detection configs
(mmdet) run mmdet's training step on ``--det-size`` images. The GPU
comparison of docs/benchmarks.md::

    python tools/analysis/benchmark.py \\
        mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py $S \\
        --in-process --device cuda --amp bf16 --optimizer adamw-fused \\
        --infer-batch 128 --train-batches 64 128 \\
        --compile-modes eager max-autotune --json --out results.jsonl
"""
import argparse
import json
import os
import subprocess
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('configs', nargs='+',
                   help='config files (or mmpretrain::/mmdet::/mmseg:: '
                   'names), each optionally followed by @key=value,...')
    p.add_argument('--modes', nargs='+', default=['infer', 'train'],
                   choices=['infer', 'train'])
    p.add_argument('--infer-batch', type=int, default=16)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5,
                   help='timed iterations; the median is reported')
    p.add_argument('--rounds', type=int, default=1,
                   help='measure every (mode, config) N times, interleaved '
                   '(round 1 of all configs, then round 2, ...), and keep '
                   "each one's best round: on a shared machine the load "
                   'changes between measurements')
    p.add_argument('--optimizer', default='adamw',
                   choices=['adamw', 'adamw-fused'],
                   help="training step's optimiser, the same for every "
                   "config: torch's default AdamW, or AdamW(fused=True)")
    p.add_argument('--amp', default=None, choices=['bf16', 'fp16'],
                   help='mixed precision (torch.autocast) for every config: '
                   "on CUDA through mmengine's AmpOptimWrapper in training; "
                   'on the CPU bf16 only (default: float32)')
    p.add_argument('--compile', action='store_true',
                   help='every backbone through torch.compile (inductor); '
                   'compiled during the warm-up iterations')
    p.add_argument('--accelerate', action='store_true',
                   help='BiFormer backbones through the opt-in '
                   'mmbiformer.models.accelerate (what tools/train.py and '
                   'tools/test.py apply on the CPU: the fusions that were '
                   'measured to pay at this capability level); other '
                   'models stay as built; with --in-process too')
    p.add_argument('--threads', type=int, default=None,
                   help='torch CPU threads (default: torch decides)')
    p.add_argument('--device', default=None, help='cpu or cuda[:N]')
    p.add_argument('--json', action='store_true',
                   help='print one JSON object per measurement')
    p.add_argument('--timeout', type=float, default=1800,
                   help='seconds allowed for one measurement')
    p.add_argument('--profile', type=int, default=0, metavar='ROWS',
                   help='after the timed iterations, profile one more step '
                   '(torch.profiler) and print its ROWS most expensive '
                   'operators; the timings are those of the unprofiled '
                   'iterations')
    p.add_argument('--in-process', action='store_true',
                   help='every config in this process, interleaved, with '
                   'a profiled step each (kernels per step, busy fraction)')
    p.add_argument('--compile-modes', nargs='+', default=['eager'],
                   help="with --in-process: 'eager' and/or torch.compile "
                   "modes ('default', 'reduce-overhead', 'max-autotune', "
                   "'max-autotune-no-cudagraphs')")
    p.add_argument('--train-batches', nargs='+', type=int, default=None,
                   help='with --in-process: training batches (default: '
                   '--train-batch)')
    p.add_argument('--det-size', nargs=2, type=int, default=[800, 1333],
                   metavar=('H', 'W'),
                   help='with --in-process: image size of detection '
                   'configs (their batch is --det-batch)')
    p.add_argument('--det-batch', type=int, default=2)
    p.add_argument('--no-profile-step', action='store_true',
                   help='with --in-process: skip the profiled step')
    p.add_argument('--out', default=None,
                   help='append the JSON records to this file')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmbiformer.analysis.benchmark import run_benchmark
    mode = args.modes[0]
    batch = args.infer_batch if mode == 'infer' else args.train_batch
    res = run_benchmark(args.configs[0], mode=mode, batch=batch,
                        img_size=args.img_size, warmup=args.warmup,
                        repeats=args.repeats, device=args.device,
                        profile_rows=args.profile, optimizer=args.optimizer,
                        amp=args.amp, compile=args.compile,
                        accelerate=args.accelerate)
    print('@@RESULT ' + json.dumps(res.as_dict()), flush=True)


def measure(args, config, mode):
    cmd = [sys.executable, os.path.abspath(__file__), config, '--worker',
           '--modes', mode, '--infer-batch', str(args.infer_batch),
           '--train-batch', str(args.train_batch), '--img-size',
           str(args.img_size), '--warmup', str(args.warmup), '--repeats',
           str(args.repeats), '--profile', str(args.profile),
           '--optimizer', args.optimizer]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    if args.device:
        cmd += ['--device', args.device]
    if args.amp:
        cmd += ['--amp', args.amp]
    if args.compile:
        cmd += ['--compile']
    if args.accelerate:
        cmd += ['--accelerate']
    env = dict(os.environ)
    if args.threads:
        env.setdefault('OMP_NUM_THREADS', str(args.threads))
    # Spinning OpenMP threads wait for descheduled peers in every parallel
    # region on a shared CPU (see docs/benchmarks.md); wait passively
    # unless the environment chooses a policy.
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith('@@RESULT '):
            return json.loads(line[len('@@RESULT '):])
    tail = '\n'.join((proc.stdout + proc.stderr).splitlines()[-15:])
    raise RuntimeError(f'benchmark of {config} ({mode}) failed:\n{tail}')


def cases_of(args):
    """The :class:`~mmbiformer.analysis.interleaved.Case` list of an
    ``--in-process`` run, in measuring order."""
    from mmbiformer.analysis.interleaved import Case, _is_detection
    modes = [None if m == 'eager' else m for m in args.compile_modes]
    cases = []
    for compile_mode in modes:
        for mode in args.modes:
            for config in args.configs:
                if _is_detection(config):
                    if mode == 'train':
                        cases.append(Case(config, 'train', args.det_batch,
                                          compile_mode,
                                          tuple(args.det_size),
                                          accelerate=args.accelerate))
                    continue
                batches = ([args.infer_batch] if mode == 'infer' else
                           args.train_batches or [args.train_batch])
                for batch in batches:
                    cases.append(Case(config, mode, batch, compile_mode,
                                      (args.img_size, args.img_size),
                                      accelerate=args.accelerate))
    return cases


def in_process(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmbiformer.analysis.interleaved import run_interleaved
    records = run_interleaved(
        cases_of(args), device=args.device, amp=args.amp,
        optimizer=args.optimizer, warmup=args.warmup, repeats=args.repeats,
        rounds=args.rounds, profile=not args.no_profile_step,
        log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.out:
        with open(args.out, 'a') as f:
            for r in records:
                f.write(json.dumps(r) + '\n')
    if args.json:
        for r in records:
            print(json.dumps(r), flush=True)
        return records
    print('| model | mode | compiled | batch | img/s | ms | peak MB | '
          'kernels | device busy |')
    print('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    for r in records:
        peak = f"{r['peak_mb']:.0f}" if r['peak_mb'] is not None else ''
        busy = (f"{100 * r['busy_fraction']:.0f} %"
                if 'busy_fraction' in r else '')
        print(f"| {r['model']} | {r['mode']} | "
              f"{r['compile_mode'] or 'eager'} | {r['batch']} | "
              f"{r['img_s']:.1f} | {r['ms_per_step']:.1f} | {peak} | "
              f"{r.get('kernels_per_step', '')} | {busy} |")
    return records


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.in_process:
        return in_process(args)
    if args.rounds < 1:
        raise SystemExit('--rounds must be >= 1')
    best = {}
    for rnd in range(args.rounds):
        for mode in args.modes:
            for config in args.configs:
                res = measure(args, config, mode)
                table = res.pop('profile', None)
                if table:
                    print(f'\n[{mode}] {config}, round {rnd + 1}: operators '
                          f'of one step by self time\n{table}', flush=True)
                key = (mode, config)
                if key not in best or res['img_per_s'] > \
                        best[key]['img_per_s']:
                    best[key] = res
                if not args.json:
                    print(f"[round {rnd + 1}/{args.rounds}] [{mode}] "
                          f"{config}: {res['img_per_s']:.2f} img/s, peak "
                          f"{res['peak_mem_mb']:.0f} MB", file=sys.stderr,
                          flush=True)
    results = []
    for mode in args.modes:
        anchor = None
        for config in args.configs:
            res = best[(mode, config)]
            res['rounds'] = args.rounds
            anchor = anchor or res['img_per_s']
            res['rel_to_first'] = res['img_per_s'] / anchor
            results.append(res)
            if args.json:
                print(json.dumps(res), flush=True)
    if not args.json:
        print(f"\ndevice: {results[0]['device']}, threads: "
              f"{results[0]['threads']}, image {args.img_size}x"
              f'{args.img_size}, median of {args.repeats} after '
              f'{args.warmup} warm-up iterations, best of {args.rounds} '
              f'interleaved round(s), training optimiser {args.optimizer}, '
              f"{'autocast ' + args.amp if args.amp else 'float32'}"
              f"{', backbones compiled' if args.compile else ''}"
              f"{', accelerate()' if args.accelerate else ''}\n")
        print('| config | mode | batch | img/s | x first | ms/iter | '
              'peak MB |')
        print('| --- | --- | ---: | ---: | ---: | ---: | ---: |')
        for r in results:
            print(f"| {r['config']} | {r['mode']} | {r['batch']} | "
                  f"{r['img_per_s']:.2f} | {r['rel_to_first']:.2f} | "
                  f"{r['ms_per_iter']:.0f} | {r['peak_mem_mb']:.0f} |")


if __name__ == '__main__':
    main()
