"""The C++ attention kernels of two revisions, in one process: each
revision's ``mmbiformer/ops/csrc/cpu_kernels.cpp`` built at the capability
level this process runs at (``ATEN_CPU_CAPABILITY``, as
:mod:`mmbiformer.ops.cpu_ext` builds it), then their forward and backward
alternated on BiFormer-S's four stages at 224x224 (batch 32, n_win 7,
random routing). Prints the median ms of each and checks that both compute
the same output.

Example (the kernels before and after their 8-lane AVX2 build)::

    ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_kernels_ab.py 0b032e4
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = 'mmbiformer/ops/csrc/cpu_kernels.cpp'
# (stage, batch, map side, heads, head dim, topk) of BiFormer-S at 224x224
STAGES = [('s1', 32, 56, 2, 32, 1), ('s2', 32, 28, 4, 32, 4),
          ('s3', 32, 14, 8, 32, 16), ('s4', 32, 7, 16, 32, 49)]
N_WIN = 7


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('before', help='a git revision of this repository')
    p.add_argument('--after', default=None,
                   help='a git revision (default: the working tree)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix='cpu_kernels_ab_')
    sources = {}
    for name, rev in (('before', args.before), ('after', args.after)):
        if rev is None:
            sources[name] = os.path.join(ROOT, SOURCE)
            continue
        text = subprocess.run(['git', 'show', f'{rev}:{SOURCE}'], cwd=ROOT,
                              check=True, capture_output=True,
                              text=True).stdout
        sources[name] = os.path.join(tmp, f'{name}.cpp')
        with open(sources[name], 'w') as f:
            f.write(text)
    from mmbiformer.ops import cpu_ext
    level = cpu_ext.capability()
    mods = {name: cpu_ext.build(f'mmb_kernels_ab_{name}_{level}', src)
            for name, src in sources.items()}
    print(f'capability {torch.backends.cpu.get_cpu_capability()}, '
          f'{torch.get_num_threads()} threads; before {args.before}, after '
          f'{args.after or "the working tree"}; ms, medians of '
          f'{args.rounds}')
    for stage, n, side, heads, d, topk in STAGES:
        torch.manual_seed(0)
        L, R = side * side, N_WIN * N_WIN
        q, k, v, grad = (torch.randn(n, L, heads, d) for _ in range(4))
        idx = torch.stack([torch.randperm(R)[:topk] for _ in range(n * R)])
        idx = idx.view(n, R, topk).contiguous()
        times = {name: ([], []) for name in mods}
        outs = {}
        for rnd in range(args.rounds + 1):  # the first round warms up
            for name, mod in mods.items():
                start = time.perf_counter()
                out, lse = mod.bra_forward(q, k, v, idx, side, side, N_WIN,
                                           d**-0.5, True)
                mid = time.perf_counter()
                dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
                mod.bra_backward(grad, q, k, v, lse, idx, side, side, N_WIN,
                                 d**-0.5, dq, dk, dv)
                end = time.perf_counter()
                outs[name] = (out, dq, dk, dv)
                if rnd:
                    times[name][0].append((mid - start) * 1e3)
                    times[name][1].append((end - mid) * 1e3)
        for a, b in zip(outs['before'], outs['after']):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        print(f'{stage}: ' + ', '.join(
            f'{name} forward {statistics.median(f):.1f} backward '
            f'{statistics.median(b):.1f}' for name, (f, b) in times.items()),
            flush=True)


if __name__ == '__main__':
    main()
