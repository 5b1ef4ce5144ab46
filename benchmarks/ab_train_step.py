"""A/B of two variants of the code in one process, step by step (training
steps, or inference forwards with ``--mode infer``).

Steps with the code as it is and steps with one object (``--target
module:attr``) replaced by another (``--replacement module:attr``)
alternate, so that a drifting machine hits both alike. Prints one JSON
object: the median step time of each variant, the median of the paired
differences (as is minus patched) and in how many pairs the code as it is
was faster. The training step is
:mod:`mmbiformer.analysis.benchmark`'s (data preprocessor, loss, backward,
AdamW).

Example (the attention through the portable implementation against the
default choice; ``my_variants`` is any importable module of yours)::

    python benchmarks/ab_train_step.py \\
        configs/classification/biformer_s_in1k.py \\
        --target mmbiformer.ops.bra:implementation \\
        --replacement my_variants:always_portable --pairs 15 --threads 2

With ``--returning None`` (or ``False``, ``True``) the patched variant
uses a function that returns that constant.
"""
import argparse
import importlib
import json
import os.path as osp
import statistics
import sys
import time

# the repository root, so that ``benchmarks.variants:NAME`` imports when
# the script runs as ``python benchmarks/ab_train_step.py``
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONSTANTS = {'None': None, 'False': False, 'True': True}


def _resolve(name: str):
    module, _, attr = name.partition(':')
    if not attr:
        raise SystemExit(f'{name!r}: expected module:attr')
    return importlib.import_module(module), attr


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='config file (or mmpretrain:: name), '
                   'optionally followed by @key=value,...')
    p.add_argument('--target', required=True, metavar='MODULE:ATTR',
                   help='the object the patched variant replaces')
    instead = p.add_mutually_exclusive_group(required=True)
    instead.add_argument('--replacement', metavar='MODULE:ATTR',
                         help='what the patched variant uses instead')
    instead.add_argument('--returning', choices=sorted(CONSTANTS),
                         help='the patched variant uses a function that '
                         'returns this constant, whatever its arguments '
                         '(e.g. a switch that picks a code path)')
    p.add_argument('--pairs', type=int, default=10)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--mode', choices=('train', 'infer'), default='train',
                   help='a training step, or an inference forward (eval '
                   'mode, no gradients)')
    p.add_argument('--same-draws', action='store_true',
                   help="seed both steps of a pair alike, so that random "
                   "layers (stochastic depth) draw the same in both: the "
                   "pair's difference then holds no luck of the draw")
    p.add_argument('--accelerate', action='store_true',
                   help='both variants run on the model after '
                   'mmbiformer.models.accelerate()')
    args = p.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmbiformer.analysis.benchmark import training_setup
    t_mod, t_attr = _resolve(args.target)
    original = getattr(t_mod, t_attr)
    if args.replacement:
        r_mod, r_attr = _resolve(args.replacement)
        patched = getattr(r_mod, r_attr)
    else:
        value = CONSTANTS[args.returning]

        def patched(*_args, **_kwargs):
            return value

    scope, model, data, optim = training_setup(args.config, args.batch,
                                               args.img_size)
    if args.accelerate:
        from mmbiformer.models.accelerate import accelerate
        accelerate(model)
    if args.mode == 'train':
        def step():
            model.train_step(data, optim)
    elif scope == 'mmpretrain':
        model.eval()

        def step():
            with torch.no_grad():
                model.test_step(data)
    else:
        # detectors and segmentors: the network's forward without the
        # post-processing (the synthetic batch has no image metadata), as
        # the tools' benchmark times it
        model.eval()

        def step():
            with torch.no_grad():
                prepared = model.data_preprocessor(data, False)
                model(prepared['inputs'], mode='tensor')
    for _ in range(args.warmup):
        step()
    times = {'as is': [], 'patched': []}
    try:
        for pair in range(args.pairs):
            for name, obj in (('as is', original), ('patched', patched)):
                setattr(t_mod, t_attr, obj)
                if args.same_draws:
                    torch.manual_seed(pair)
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    finally:
        setattr(t_mod, t_attr, original)
    diffs = [a - b for a, b in zip(times['as is'], times['patched'])]
    print(json.dumps({
        'config': args.config, 'mode': args.mode,
        'accelerate': args.accelerate, 'same_draws': args.same_draws,
        'target': args.target,
        'replacement': args.replacement or f'returning {args.returning}',
        'pairs': args.pairs,
        'median_ms_as_is': round(statistics.median(times['as is']) * 1e3),
        'median_ms_patched': round(statistics.median(times['patched']) *
                                   1e3),
        'paired_median_diff_ms_as_is_minus_patched': round(
            statistics.median(diffs) * 1e3),
        'pairs_as_is_faster': sum(d < 0 for d in diffs),
    }))


if __name__ == '__main__':
    main()
