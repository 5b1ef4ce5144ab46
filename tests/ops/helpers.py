"""Helpers shared by the op tests."""


def run_backends(module, x, grad, backends):
    """For each backend: ``(output, input grad, {name: param grad},
    routing info)`` of ``module(x)`` with the loss ``(output * grad).sum()``.
    """
    results = []
    for backend in backends:
        module.backend = backend
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y, info = module(xi, return_routing=True)
        (y * grad).sum().backward()
        results.append((y, xi.grad, {k: p.grad.clone() for k, p in
                                     module.named_parameters()}, info))
    return results


def make_maps(n, heads, n_win, rh, rw, topk, d, dv, masked=False,
              dtype=None, device='cpu', seed=0):
    """Random q, k ``(N, H, W, heads * d)`` and v ``(N, H, W, heads *
    dv)``, all slices of one ``qkv`` map (as the layer makes them), and a
    random :class:`RegionGraph` (with a random key mask if ``masked``;
    the first token of every region stays valid)."""
    import torch

    from mmbiformer.ops import RegionGraph

    g = torch.Generator().manual_seed(seed)
    h, w = n_win * rh, n_win * rw
    qkv = torch.randn(n, h, w, heads * (2 * d + dv), generator=g)
    q, k, v = qkv.split([heads * d, heads * d, heads * dv], dim=-1)
    r = n_win * n_win
    idx = torch.rand(n, r, r, generator=g).topk(topk, dim=-1).indices
    key_valid = None
    if masked:
        key_valid = torch.rand(h, w, generator=g) > 0.3
        key_valid[::rh, ::rw] = True
        key_valid = key_valid.to(device)
    maps = [t.to(device, dtype or torch.float32) for t in (q, k, v)]
    return maps, RegionGraph(idx.to(device), n_win, key_valid)


def fwd_bwd(maps, graph, heads, backend, grad=None, scale=0.4):
    """Output and q/k/v gradients of ``bra`` with the loss ``(out *
    grad).sum()`` (``grad`` random if not given); returns them and
    ``grad``."""
    import torch

    from mmbiformer.ops import bra

    q, k, v = (t.detach().clone().requires_grad_() for t in maps)
    out = bra(q, k, v, graph, heads, scale=scale, backend=backend)
    if grad is None:
        grad = torch.randn_like(out)
    out.backward(grad)
    return [out, q.grad, k.grad, v.grad], grad
