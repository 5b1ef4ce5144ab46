"""Before and after a change, in one process: the BiFormer backbone of an
older checkout of this project against the current one, with Swin-T as
the peer.

The older checkout's ``mmbiformer`` package is copied under another name
(``mmbiformer_before``; its C++ kernels build under another name too), so
that both versions import side by side without registering into the
toolboxes twice. Their training steps (backbone forward, a mean-square
loss on the last output, backward, AdamW) or inference forwards then
alternate, so that a drifting machine hits all alike; each round starts
one model later, and each turn times a model's step after an untimed one
(``--turn-warmup``), so that a timed step follows a step of its own model
rather than another model's, whose heap it would inherit (the page faults
still depend on what the other models keep). The current model
runs after ``mmbiformer.models.accelerate()`` (what the tools do), the
older one after its own ``accelerate()`` where it has one (what its tools
did; ``--before-plain`` leaves it as built) and as it was built where it
has none (before the operator, its fusions were inside the block).
Prints, per mode, the median step of each and Swin-T's step over each
BiFormer's (above 1: faster than Swin-T), and the memory pages each step
faults in with the system time it takes.
``--hybrid`` adds the current backbone with the older attention layers.

Example (the before/after table of ``docs/benchmarks.md``)::

    git worktree add ../before 9feb38e
    python benchmarks/before_after.py ../before --threads 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/before_after.py ../before --threads 2 \\
        --before-pure-torch

``--before-pure-torch`` turns the older checkout's C++ kernels off (as
``MMBIFORMER_CPU_EXT=0`` did for it alone) and leaves the current one's
alone.
"""
import argparse
import importlib
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time

ALIAS = 'mmbiformer_before'


def copy_package(checkout: str, dest: str) -> None:
    """``checkout/mmbiformer`` -> ``dest/ALIAS``, imports renamed, the
    registering ``__init__`` emptied, the C++ extension renamed."""
    src = os.path.join(checkout, 'mmbiformer')
    if not os.path.isdir(src):
        raise SystemExit(f'{checkout!r} holds no mmbiformer package')
    target = os.path.join(dest, ALIAS)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns('__pycache__'))
    for root, _, files in os.walk(target):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(root, name)
            with open(path) as f:
                text = f.read()
            text = re.sub(r'\bmmbiformer(?=[.: ])', ALIAS, text)
            text = text.replace("name='mmbiformer_cpu_kernels'",
                                f"name='{ALIAS}_cpu_kernels'")
            with open(path, 'w') as f:
                f.write(text)
    with open(os.path.join(target, '__init__.py'), 'w') as f:
        f.write('')  # no registration into the toolboxes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('before', help='a checkout of the older version')
    p.add_argument('--arch', default='small')
    p.add_argument('--drop-path-rate', type=float, default=0.15)
    p.add_argument('--modes', nargs='+', default=['train', 'infer'],
                   choices=['train', 'infer'])
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--infer-batch', type=int, default=16)
    p.add_argument('--rounds', type=int, default=8)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--before-pure-torch', action='store_true',
                   help="the older version without its C++ kernels")
    p.add_argument('--before-plain', action='store_true',
                   help="the older version without its accelerate() "
                   'transform, where it has one')
    p.add_argument('--hybrid', action='store_true',
                   help="also the current backbone with the older version's "
                   'attention layers (BiLevelRoutingAttention), to tell the '
                   "attention's share of a difference from the rest")
    p.add_argument('--turn-warmup', type=int, default=1,
                   help='untimed steps of a model before each timed one '
                   '(0: one timed step per turn, as before 2026-12-07)')
    p.add_argument('--fixed-order', action='store_true',
                   help='the models in the same order every round (by '
                   'default each round starts one model later)')
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix='before_after_')
    try:
        copy_package(args.before, tmp)
        sys.path.insert(0, tmp)
        run(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> None:
    """The interleaved measurement, the older package importable."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.before_pure_torch:
        old_ext = importlib.import_module(f'{ALIAS}.ops.cpu_ext')
        old_ext._enabled = lambda: False
    before = importlib.import_module(f'{ALIAS}.models.biformer')
    before_attention = importlib.import_module(
        f'{ALIAS}.ops.module').BiLevelRoutingAttention

    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    import mmbiformer  # noqa: F401  (registers into the toolboxes)
    from mmbiformer.models import BiFormer
    from mmbiformer.models.accelerate import accelerate
    register_all_modules(False)

    torch.manual_seed(0)
    kw = dict(arch=args.arch, drop_path_rate=args.drop_path_rate)
    models = {'before': before.BiFormer(**kw), 'after': BiFormer(**kw)}
    models['after'].load_state_dict(models['before'].state_dict())
    accelerate(models['after'])
    before_accelerate = _older_accelerate()
    if before_accelerate is not None and not args.before_plain:
        before_accelerate(models['before'])
    if args.hybrid:
        models['hybrid'] = _hybrid(before_attention, BiFormer(**kw))
        models['hybrid'].load_state_dict(models['before'].state_dict())
    models['swin-t'] = MODELS.build(
        dict(type='SwinTransformer', arch='tiny', img_size=224,
             drop_path_rate=0.2))
    optims = {k: torch.optim.AdamW(m.parameters()) for k, m in models.items()}
    x_train = torch.randn(args.train_batch, 3, 224, 224)
    x_infer = torch.randn(args.infer_batch, 3, 224, 224)

    def train(name):
        model = models[name]
        model.train()
        model(x_train)[-1].square().mean().backward()
        optims[name].step()
        optims[name].zero_grad()

    def infer(name):
        model = models[name]
        model.eval()
        with torch.no_grad():
            model(x_infer)

    print(f'torch {torch.__version__}, capability '
          f'{torch.backends.cpu.get_cpu_capability()}, '
          f'{torch.get_num_threads()} threads, before: {args.before}'
          + (' without its C++ kernels' if args.before_pure_torch else '')
          + (' after its accelerate()' if before_accelerate is not None
             and not args.before_plain else ''))
    for mode in args.modes:
        step = train if mode == 'train' else infer
        for name in models:
            for _ in range(args.warmup):
                step(name)
        times = {name: [] for name in models}
        faults = {name: [] for name in models}
        names = list(models)
        for i in range(args.rounds):
            # each model after each other one alike, against drift
            order = names if args.fixed_order else \
                names[i % len(names):] + names[:i % len(names)]
            for name in order:
                # untimed steps first: a model's first step after another
                # model's inherits that model's heap (how much of it the
                # allocator has kept mapped) and pays page faults by the
                # order of the models, not by its own code
                for _ in range(args.turn_warmup):
                    step(name)
                use = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - start)
                end = resource.getrusage(resource.RUSAGE_SELF)
                faults[name].append((end.ru_minflt - use.ru_minflt,
                                     end.ru_stime - use.ru_stime))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        swin = med['swin-t']
        print(f'{mode}: ' + ', '.join(f'{k} {v:.0f} ms' for k, v in
                                      med.items())
              + f' | Swin-T / before {swin / med["before"]:.3f}, '
              f'Swin-T / after {swin / med["after"]:.3f}', flush=True)
        # memory pages a step faults in, and the system time it takes
        print('  minor page faults / system ms a step (medians): ' + ', '.join(
            f'{k} {statistics.median(f for f, _ in v):.0f} / '
            f'{statistics.median(t for _, t in v) * 1e3:.0f}'
            for k, v in faults.items()), flush=True)


def _older_accelerate():
    """The older version's ``models.accelerate.accelerate``, or None where
    it has none."""
    try:
        module = importlib.import_module(f'{ALIAS}.models.accelerate')
    except ModuleNotFoundError:
        return None
    return getattr(module, 'accelerate', None)


def _hybrid(attention_cls, model):
    """``model`` with every routing attention layer replaced by an
    ``attention_cls`` (the older version's) of the same settings."""
    from mmbiformer.models.accelerate import accelerate
    from mmbiformer.ops.module import BiLevelRoutingAttention
    accelerate(model)
    for block in model.modules():
        layer = getattr(block, 'attn', None)
        if isinstance(layer, BiLevelRoutingAttention):
            block.attn = attention_cls(
                layer.dim, layer.num_heads, layer.n_win, layer.qk_dim,
                layer.scale, layer.topk, layer.side_dwconv, layer.auto_pad,
                layer.pad_mode)
    return model


if __name__ == '__main__':
    main()
