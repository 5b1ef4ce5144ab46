"""Compare the two backward variants of the ``triton`` BRA backend.

``mmbiformer.ops.triton_bra.BACKWARD``: ``atomic`` (one kernel, dK/dV added
with atomic adds) and ``inverted`` (dQ, then dK/dV per key block from an
inverted routing index; bit-reproducible). For every shape and dtype, the
BRA layer as the model runs it (token order, ``auto_pad``) is timed forward
+ backward with CUDA events over ``--iters`` steps after 3 warm-up steps,
once per variant, in one process; also its peak memory above the inputs
and the largest difference of the input gradients between the variants.
Prints one JSON object per (shape, dtype). Needs CUDA and Triton.

Example (the table in docs/benchmarks.md)::

    python benchmarks/triton_backward_ab.py
"""
import argparse
import json

import torch

# name, batch, h, w, dim, heads, n_win, topk: BiFormer-S stages 1-3 at
# 224x224 (batch 64) and at 800x1216 (batch 2)
SHAPES = [
    ('cls-s1', 64, 56, 56, 64, 2, 7, 1),
    ('cls-s2', 64, 28, 28, 128, 4, 7, 4),
    ('cls-s3', 64, 14, 14, 256, 8, 7, 16),
    ('det-s1', 2, 200, 304, 64, 2, 16, 1),
    ('det-s2', 2, 100, 152, 128, 4, 16, 4),
    ('det-s3', 2, 50, 76, 256, 8, 16, 16),
]


def cuda_ms(fn, iters: int) -> float:
    """Mean milliseconds of ``fn()`` over ``iters`` calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measure(shape, dtype: torch.dtype, iters: int) -> dict:
    from mmbiformer.ops import BiLevelRoutingAttention, triton_bra
    name, batch, h, w, dim, heads, n_win, topk = shape
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(dim, heads, n_win, topk=topk,
                                    auto_pad=True, backend='triton')
    layer = layer.cuda().to(dtype)
    x = torch.randn(batch, h, w, dim, device='cuda', dtype=dtype,
                    requires_grad=True)
    g = torch.randn_like(x)
    row = dict(shape=name, dtype=str(dtype).split('.')[-1])
    grads = {}
    saved = triton_bra.BACKWARD
    try:
        for mode in ('atomic', 'inverted'):
            triton_bra.BACKWARD = mode

            def step():
                x.grad = None
                layer(x).backward(g)

            row[f'{mode}_fwd_bwd_ms'] = round(cuda_ms(step, iters), 3)
            with torch.no_grad():
                row['fwd_ms'] = round(cuda_ms(lambda: layer(x), iters), 3)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row[f'{mode}_peak_mb'] = round(
                (torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            grads[mode] = x.grad.float().clone()
    finally:
        triton_bra.BACKWARD = saved
    row['max_diff'] = (grads['atomic'] - grads['inverted']).abs().max().item()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dtypes', nargs='+', default=['bfloat16', 'float32'],
                   choices=['bfloat16', 'float16', 'float32'])
    p.add_argument('--shapes', nargs='+', default=[s[0] for s in SHAPES],
                   choices=[s[0] for s in SHAPES])
    p.add_argument('--iters', type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('triton_backward_ab.py needs a CUDA device: the '
                         'two variants differ in how they use the GPU')
    for dtype in args.dtypes:
        for shape in SHAPES:
            if shape[0] in args.shapes:
                print(json.dumps(measure(shape, getattr(torch, dtype),
                                         args.iters)), flush=True)


if __name__ == '__main__':
    main()
