"""Shared fixtures of the reliability tests (issue #7): a mini BiFormer.

The mini architecture keeps every stage kind of the real ones (routing
attention with topk 1, 4 and 16, then global attention) at a fraction of
the cost.
"""
import pytest
import torch

pytest.importorskip('mmengine')
pytest.importorskip('mmcv')

from mini_arch import MINI  # noqa: E402

import mmbiformer  # noqa: E402,F401  (safe loading, registries)
from mmbiformer.models import BiFormer  # noqa: E402


def make_mini(state=None, **kwargs) -> BiFormer:
    """A mini BiFormer with all four outputs, in eval mode; ``state`` is
    loaded if given."""
    kwargs.setdefault('out_indices', (0, 1, 2, 3))
    model = BiFormer(arch=MINI, **kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope='session')
def mini_state():
    """Official-style initialised weights of the mini backbone, with
    non-trivial BatchNorm statistics so that eval mode is not an identity
    for the norms."""
    torch.manual_seed(0)
    model = BiFormer(arch=MINI, out_indices=(0, 1, 2, 3))
    model.init_weights()
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 112, 112) * 1.5 + 0.2)
    return {k: v.clone() for k, v in model.state_dict().items()}
