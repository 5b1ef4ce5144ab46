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
