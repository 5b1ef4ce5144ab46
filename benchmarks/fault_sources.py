"""Which operators of a training step fault memory pages in.

A page the process touches for the first time since the allocator took it
from the system costs a minor page fault (a few microseconds on a virtual
machine). This script runs warm-up training steps of the BiFormer backbone
(forward, a mean-square loss on the last output, backward, AdamW, as
``before_after.py`` does), then one more under a dispatch mode that reads
the process's minor-fault count around every operator, and prints the
operators that faulted most, summed by name, and the single calls that
faulted most with the bytes of their outputs.

Examples (the second: an older checkout, e.g. ``git worktree add
../before 9feb38e``)::

    python benchmarks/fault_sources.py --threads 2
    TORCH_EXTENSIONS_DIR=../before_ext python benchmarks/fault_sources.py \
        --threads 2 --checkout ../before --no-accelerate
"""
import argparse
import collections
import os.path as osp
import resource
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='small')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--no-accelerate', action='store_true',
                   help='the model as built, without accelerate()')
    p.add_argument('--checkout', default=ROOT,
                   help='the checkout whose mmbiformer package to import '
                   '(an older one: with --no-accelerate if it has no '
                   'accelerate(); give it its own TORCH_EXTENSIONS_DIR)')
    args = p.parse_args(argv)
    sys.path.insert(0, osp.abspath(args.checkout))

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import mmbiformer  # noqa: F401
    from mmbiformer.models import BiFormer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BiFormer(arch=args.arch, drop_path_rate=0.15)
    if not args.no_accelerate:
        from mmbiformer.models.accelerate import accelerate
        accelerate(model)
    model.train()
    optim = torch.optim.AdamW(model.parameters())
    x = torch.randn(args.batch, 3, 224, 224)

    def step():
        model(x)[-1].square().mean().backward()
        optim.step()
        optim.zero_grad()

    for _ in range(args.warmup):
        step()

    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = _faults()
            out = func(*args, **(kwargs or {}))
            n = _faults() - before
            if n:
                size = sum(t.untyped_storage().nbytes()
                           for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor))
                calls.append((n, str(func), size))
            return out

    start = _faults()
    with Count():
        step()
    total = _faults() - start
    by_op = collections.Counter()
    for n, name, _ in calls:
        by_op[name] += n
    print(f'{total} minor faults in one training step (batch {args.batch}), '
          f'{sum(by_op.values())} inside operators')
    print('by operator:')
    for name, n in by_op.most_common(args.top):
        print(f'  {n:8d}  {name}')
    print('largest single calls (faults, operator, output MB):')
    for n, name, size in sorted(calls, reverse=True)[:args.top]:
        print(f'  {n:8d}  {name}  {size / 2**20:.1f}')


if __name__ == '__main__':
    main()
