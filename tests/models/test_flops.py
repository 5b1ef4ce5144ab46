"""Parameters and FLOPs (fvcore convention) equal the official numbers for
every attention backend."""
import pytest
import torch

pytest.importorskip('mmengine')
pytest.importorskip('mmpretrain')

import mmbiformer  # noqa: E402,F401  (registers BiFormer)
from mmbiformer.models.complexity import (  # noqa: E402
    count_params,
    flop_analysis,
)
from mmbiformer.ops import BACKENDS, triton_available  # noqa: E402

# fvcore counts of the official models at 224x224 (paper: 2.2 / 4.5 / 9.8 G)
OFFICIAL_GFLOPS = {'tiny': 2.23, 'small': 4.49, 'base': 9.80}
OFFICIAL_PARAMS = {'tiny': 13_142_760, 'small': 25_536_232,
                   'base': 56_804_968}


def classifier(arch: str, backend: str = 'official'):
    from mmpretrain.registry import MODELS
    width = 768 if arch == 'base' else 512
    return MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(type='BiFormer', arch=arch, attn_backend=backend),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead', num_classes=1000, in_channels=width)))


@pytest.fixture(scope='module')
def tiny_official_flops():
    total, _ = flop_analysis(classifier('tiny'), torch.randn(1, 3, 224, 224))
    return total


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_official_params_and_flops(arch, tiny_official_flops):
    model = classifier(arch)
    assert count_params(model) == OFFICIAL_PARAMS[arch]
    if arch == 'tiny':
        total = tiny_official_flops
    else:
        total, by_module = flop_analysis(model, torch.randn(1, 3, 224, 224))
    assert round(total / 1e9, 2) == OFFICIAL_GFLOPS[arch]


@pytest.mark.parametrize('backend', [
    b for b in BACKENDS if b not in ('official', 'triton')
] + (['triton'] if triton_available() else []))
def test_official_flops_for_every_backend(backend, tiny_official_flops):
    model = classifier('tiny', backend)
    total, by_module = flop_analysis(model, torch.randn(1, 3, 224, 224))
    assert total == tiny_official_flops
    # the counted routing attention of stage 1 is not zero
    assert by_module['backbone.stages.0.0.attn'] > 0
    # and the backend is restored after counting
    assert model.backbone.attn_backend == backend
