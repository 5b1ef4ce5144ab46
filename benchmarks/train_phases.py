"""Where a training step goes: configs side by side in one process, by phase.

Builds every config, then runs their training steps in turn (config 1,
config 2, ..., again), so that a drifting machine hits all alike, and
times three phases of each step: ``forward`` (data preprocessor, forward,
loss), ``backward`` and ``optimizer`` (AdamW step and zeroing the
gradients). Prints one JSON object per config: the median of each phase
and of the whole step, in ms. The step is that of
:mod:`mmbiformer.analysis.benchmark` (same synthetic batch, same AdamW).

Unlike ``benchmark.py``, which runs each config in a fresh process, the
models share one process here: the figures compare phases, not a model's
throughput on its own.

Example (the phase table in docs/benchmarks.md)::

    python benchmarks/train_phases.py \\
        mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py \\
        configs/classification/biformer_s_in1k.py --steps 10 --threads 2
"""
import argparse
import json
import statistics
import time

PHASES = ('forward', 'backward', 'optimizer')


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('configs', nargs='+',
                   help='config files (or mmpretrain:: names), each '
                   'optionally followed by @key=value,...')
    p.add_argument('--steps', type=int, default=10,
                   help='timed steps per config')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit('--steps must be >= 1')

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmbiformer.analysis.benchmark import training_setup
    runs = []
    for target in args.configs:
        _, model, data, optim = training_setup(target, args.batch,
                                               args.img_size)
        runs.append((target, model, data, optim,
                     {name: [] for name in PHASES}))

    def step(model, data, optim, times=None):
        start = time.perf_counter()
        with optim.optim_context(model):
            prepared = model.data_preprocessor(data, True)
            losses = model._run_forward(prepared, mode='loss')
        loss, _ = model.parse_losses(losses)
        mid = time.perf_counter()
        optim.backward(loss)
        back = time.perf_counter()
        optim.step()
        optim.zero_grad()
        end = time.perf_counter()
        if times is not None:
            times['forward'].append(mid - start)
            times['backward'].append(back - mid)
            times['optimizer'].append(end - back)

    for _ in range(args.warmup):
        for _, model, data, optim, _ in runs:
            step(model, data, optim)
    for _ in range(args.steps):
        for _, model, data, optim, times in runs:
            step(model, data, optim, times)
    for target, _, _, _, times in runs:
        totals = [sum(parts) for parts in zip(*times.values())]
        row = {'config': target, 'steps': args.steps, 'batch': args.batch}
        row.update({f'{name}_ms': round(statistics.median(t) * 1e3, 1)
                    for name, t in times.items()})
        row['step_ms'] = round(statistics.median(totals) * 1e3, 1)
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
    main()
