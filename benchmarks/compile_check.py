"""Graph breaks of the whole BiFormer backbone under ``torch.compile`` and
how far the compiled model is from eager.

For each arch and input size: ``torch._dynamo.explain`` in training mode
(input with gradients, drop path on) and in eval mode, statically and with
``dynamic=True``; then, with ``--compare``, one inductor compile of a
training step (forward and backward) against eager: the largest output
difference, the largest relative gradient difference, and how many region
routings (top-k choices) differ, with the smallest gap between the last
kept and the first dropped routing logit of eager's routing (a tie within
float rounding lets compiled and eager route differently, which moves that
region's output by a visible amount: the way a compiled model can be far
from eager without a bug).

    python benchmarks/compile_check.py --arch tiny small base \\
        --size 224x224@7 512x512@8 800x1216@16
    python benchmarks/compile_check.py --arch tiny --size 224x224@7 --compare
"""
import argparse
import json
import time

import torch


def _model(arch, n_win, auto_pad, train, drop_path=0.1):
    import mmbiformer  # noqa: F401
    from mmbiformer.models import BiFormer
    torch.manual_seed(0)
    model = BiFormer(arch=arch, n_win=n_win, out_indices=(0, 1, 2, 3),
                     auto_pad=auto_pad,
                     drop_path_rate=drop_path if train else 0.)
    model.init_weights()
    return model.train(train)


def graph_breaks(arch, size, n_win, train, dynamic):
    h, w = size
    auto_pad = bool(h % (32 * n_win) or w % (32 * n_win))
    model = _model(arch, n_win, auto_pad, train)
    x = torch.randn(1, 3, h, w, requires_grad=train)
    torch._dynamo.reset()
    fn = torch._dynamo.explain(model)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 2)
        torch._dynamo.mark_dynamic(x, 3)
    out = fn(x)
    return dict(arch=arch, size=f'{h}x{w}', n_win=n_win, auto_pad=auto_pad,
                mode='train' if train else 'eval', dynamic=dynamic,
                graph_breaks=out.graph_break_count, graphs=out.graph_count,
                reasons=sorted({str(r.reason)[:120]
                                for r in out.break_reasons}))


class _RecordRoutes:
    """Within ``with``: every routing's logits and top-k index (eager
    runs only: ``region_graph`` looks ``route`` up at each call)."""

    def __enter__(self):
        from mmbiformer.ops import routing
        self.seen, self._orig = [], routing.route

        def recording(*args, **kwargs):
            logits, idx = self._orig(*args, **kwargs)
            self.seen.append((logits.detach(), idx.detach()))
            return logits, idx
        routing.route = recording
        return self.seen

    def __exit__(self, *exc):
        from mmbiformer.ops import routing
        routing.route = self._orig


def compare(arch, size, n_win, batch=2):
    """Inductor vs eager: one training step without drop path."""
    h, w = size
    auto_pad = bool(h % (32 * n_win) or w % (32 * n_win))
    model = _model(arch, n_win, auto_pad, True, drop_path=0.)
    x = torch.randn(batch, 3, h, w)

    def step(m):
        outs = m(x)
        sum(o.float().square().mean() for o in outs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return [o.detach() for o in outs], grads

    with _RecordRoutes() as eager_routes:
        eager = step(model)
    torch._dynamo.reset()
    t0 = time.time()
    compiled = torch.compile(model, fullgraph=True)
    comp = step(compiled)
    compile_s = time.time() - t0
    out_diff = max((a - b).abs().max().item()
                   for a, b in zip(comp[0], eager[0]))
    # relative gradient errors, over the gradients that are not zero in
    # exact arithmetic (the conv biases before BatchNorm are rounding
    # noise, about 1e-6 of the largest gradient: they are left out)
    largest = max(g.norm().item() for g in eager[1].values())
    grad_rel = max(((comp[1][n] - g).norm() / g.norm()).item()
                   for n, g in eager[1].items()
                   if g.norm().item() > 1e-5 * largest)
    gaps = []
    for logits, idx in eager_routes:
        k = idx.shape[-1]
        if k == logits.shape[-1]:
            continue
        top = logits.topk(k + 1, dim=-1).values
        gaps.append((top[..., k - 1] - top[..., k]).min().item())
    return dict(arch=arch, size=f'{h}x{w}', n_win=n_win, batch=batch,
                compile_s=round(compile_s, 1), max_out_diff=out_diff,
                max_grad_rel_diff=grad_rel,
                smallest_routing_gap=min(gaps) if gaps else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', nargs='+', default=['tiny'])
    p.add_argument('--size', nargs='+', default=['224x224@7'],
                   help='HxW@N_WIN')
    p.add_argument('--compare', action='store_true',
                   help='also compile a training step with inductor and '
                   'compare it with eager')
    p.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for arch in args.arch:
        for spec in args.size:
            hw, _, nw = spec.partition('@')
            size = tuple(int(v) for v in hw.split('x'))
            for train in (True, False):
                for dynamic in (False, True):
                    print(json.dumps(graph_breaks(arch, size, int(nw), train,
                                                  dynamic)), flush=True)
            if args.compare:
                print(json.dumps(compare(arch, size, int(nw))), flush=True)


if __name__ == '__main__':
    main()
