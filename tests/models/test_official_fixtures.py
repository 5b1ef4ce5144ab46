"""Equality with the official BiFormer implementation.

Uses the reference outputs in ``../shared/fixtures/official`` (beside the
repository root; see its README): official checkpoints of a small BiFormer
in the ImageNet and in the mmdet/mmseg format, their inputs and outputs, and
the state-dict layout of the official tiny/small/base models.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmengine')
pytest.importorskip('mmpretrain')

from mini_arch import MINI  # noqa: E402

import mmbiformer  # noqa: E402,F401  (registers BiFormer)
from mmbiformer.models import BiFormer  # noqa: E402
from mmbiformer.models.checkpoint import (  # noqa: E402
    MM,
    OFFICIAL_DENSE,
    OFFICIAL_IN1K,
    convert_official_checkpoint,
    detect_format,
    extract_state_dict,
    load_biformer_checkpoint,
)

from .official import FIXTURES, REPO, TOL, load  # noqa: E402,F401
from .official import needs_fixtures as pytestmark  # noqa: E402,F401


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_fixture_mini_config_matches_arch(manifest):
    """The mini arch dict used here is the one the fixtures were made with.
    """
    for name in ('mini_in1k', 'mini_dense'):
        cfg = manifest['configs'][name]
        assert cfg['embed_dim'] == MINI['embed_dims']
        assert cfg['depth'] == MINI['depths']
        assert cfg['topks'] == MINI['topks']
        assert cfg['qk_dims'] == MINI['embed_dims']
        assert cfg['head_dim'] == MINI['head_dim']
        assert cfg['mlp_ratios'] == MINI['mlp_ratios']
        assert cfg['side_dwconv'] == 5 and cfg['before_attn_dwconv'] == 3


def test_official_format_detection():
    in1k = extract_state_dict(load('biformer_mini_in1k_official.pth'))
    dense = extract_state_dict(load('biformer_mini_dense_official.pth'))
    assert in1k[1] == 'model' and dense[1] == 'state_dict'
    assert detect_format(in1k[0]) == OFFICIAL_IN1K
    assert detect_format(dense[0]) == OFFICIAL_DENSE
    converted, _ = convert_official_checkpoint(
        load('biformer_mini_in1k_official.pth'))
    assert detect_format(converted['state_dict']) == MM
    with pytest.raises(ValueError, match='already in the OpenMMLab layout'):
        convert_official_checkpoint(converted)
    with pytest.raises(ValueError, match='No BiFormer backbone keys'):
        detect_format({'conv.weight': torch.zeros(1)})


@pytest.mark.parametrize('backend', ['official', 'torch', 'auto'])
def test_official_mini_classifier_fixture(tmp_path, backend):
    """Converted official ImageNet checkpoint in an mmpretrain classifier
    reproduces the official logits and every stage output."""
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS

    converted, fmt = convert_official_checkpoint(
        load('biformer_mini_in1k_official.pth'))
    assert fmt == OFFICIAL_IN1K
    path = tmp_path / 'mini_in1k_mm.pth'
    torch.save(converted, path)

    model = MODELS.build(
        dict(
            type='ImageClassifier',
            backbone=dict(
                type='BiFormer', arch=MINI, n_win=7, attn_backend=backend),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10,
                      in_channels=256)))
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    model.eval()

    stage_outputs = []
    for stage in model.backbone.stages:
        stage[-1].register_forward_hook(
            lambda m, i, o: stage_outputs.append(o))
    io = load('biformer_mini_in1k_io.pth')
    with torch.no_grad():
        logits = model(io['input'])  # mode='tensor'
    assert max_diff(logits, io['logits']) <= TOL
    assert len(stage_outputs) == 4
    for ours, official in zip(stage_outputs, io['stage_outputs']):
        assert max_diff(ours, official) <= TOL


def _last_block_outputs(backbone: BiFormer, x: torch.Tensor) -> list:
    """The output of every stage's last block (before any out-norm)."""
    outs = []
    hooks = [stage[-1].register_forward_hook(
        lambda m, i, o: outs.append(o.cpu())) for stage in backbone.stages]
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_official_mini_fixtures_on_cuda(backend):
    """On a GPU, float32 without TF32: the official ImageNet and dense
    checkpoints reproduce the official outputs (computed on the CPU) with
    every CUDA backend."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        backbone = BiFormer(
            arch=MINI, n_win=7, attn_backend=backend,
            init_cfg=dict(type='Pretrained', checkpoint=str(
                FIXTURES / 'biformer_mini_in1k_official.pth')))
        backbone.init_weights()
        io = load('biformer_mini_in1k_io.pth')
        outs = _last_block_outputs(backbone.cuda().eval(),
                                   io['input'].cuda())
        assert len(outs) == 4
        for ours, official in zip(outs, io['stage_outputs']):
            assert max_diff(ours, official) <= TOL

        backbone = BiFormer(
            arch=MINI, n_win=16, out_indices=(0, 1, 2, 3), auto_pad=True,
            attn_backend=backend,
            init_cfg=dict(type='Pretrained', prefix='backbone.',
                          checkpoint=str(
                              FIXTURES / 'biformer_mini_dense_official.pth')))
        backbone.init_weights()
        io = load('biformer_mini_dense_io.pth')
        with torch.no_grad():
            outs = backbone.cuda().eval()(io['input'].cuda())
        assert len(outs) == 4
        for ours, official in zip(outs, io['stage_outputs']):
            assert max_diff(ours.cpu(), official) <= TOL
    finally:
        (torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = tf32


def test_official_in1k_pretrained_init_into_backbone():
    """``init_cfg=Pretrained`` on the official ImageNet file (no
    conversion): the BN out-norm comes from ``norm``, the head is dropped."""
    path = str(FIXTURES / 'biformer_mini_in1k_official.pth')
    io = load('biformer_mini_in1k_io.pth')
    backbone = BiFormer(
        arch=MINI,
        n_win=7,
        attn_backend='official',
        init_cfg=dict(type='Pretrained', checkpoint=path))
    assert backbone.out_norm == 'bn'
    backbone.init_weights()
    backbone.eval()
    with torch.no_grad():
        (feat, ) = backbone(io['input'])
    official = load('biformer_mini_in1k_official.pth')['model']
    logits = feat.mean((2, 3)) @ official['head.weight'].t() + \
        official['head.bias']
    assert max_diff(logits, io['logits']) <= TOL

    # a 'backbone.' prefix (as for converted files) is ignored with a note
    backbone = BiFormer(arch=MINI, out_indices=(0, 1, 2, 3), out_norm=None)
    report = load_biformer_checkpoint(backbone, path, prefix='backbone.')
    assert report['format'] == OFFICIAL_IN1K
    assert report['missing'] == [] and report['unexpected'] == []
    assert sorted(report['dropped']) == ['head.bias', 'head.weight']
    # the classification BN has no place in a backbone without out-norms
    assert 'norm3.running_mean' in report['skipped_norms']
    backbone.eval()
    with torch.no_grad():
        outs = backbone(io['input'])
    for ours, official in zip(outs, io['stage_outputs']):
        assert max_diff(ours, official) <= TOL

    with pytest.raises(ValueError, match="prefix 'model.'"):
        load_biformer_checkpoint(
            backbone,
            str(FIXTURES / 'biformer_mini_dense_official.pth'),
            prefix='model.')


def test_official_mini_dense_fixture():
    """Official mmdet/mmseg checkpoint through ``init_cfg=Pretrained`` with
    ``prefix='backbone.'``: the four normalised outputs at 250x330."""
    path = str(FIXTURES / 'biformer_mini_dense_official.pth')
    backbone = BiFormer(
        arch=MINI,
        n_win=16,
        out_indices=(0, 1, 2, 3),
        auto_pad=True,
        pad_mode='legacy',
        attn_backend='official',
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    assert backbone.out_norm == 'ln'
    backbone.init_weights()
    backbone.eval()
    io = load('biformer_mini_dense_io.pth')
    with torch.no_grad():
        outs = backbone(io['input'])
    assert len(outs) == 4
    for ours, official in zip(outs, io['stage_outputs']):
        assert max_diff(ours, official) <= TOL

    report = load_biformer_checkpoint(
        BiFormer(arch=MINI, n_win=16, out_indices=(0, 1, 2, 3),
                 auto_pad=True), path, prefix='backbone.')
    assert report['format'] == OFFICIAL_DENSE
    assert report['missing'] == [] and report['unexpected'] == []
    assert report['skipped_norms'] == [] and report['shape_mismatch'] == []
    assert report['renamed']['extra_norms.2.weight'] == 'norm2.weight'


def test_official_dense_converter_cli(tmp_path):
    """``tools/model_converters/biformer_official2mm.py SRC DST`` on the
    official dense checkpoint; the result loads strictly (with prefix)."""
    dst = tmp_path / 'mini_dense_mm.pth'
    subprocess.run([
        sys.executable,
        str(REPO / 'tools' / 'model_converters' / 'biformer_official2mm.py'),
        str(FIXTURES / 'biformer_mini_dense_official.pth'),
        str(dst)
    ],
                   check=True,
                   capture_output=True,
                   text=True)
    state_dict = torch.load(dst, weights_only=True)['state_dict']
    assert not any('extra_norms' in k for k in state_dict)
    backbone = BiFormer(
        arch=MINI, n_win=16, out_indices=(0, 1, 2, 3), auto_pad=True)
    backbone.load_state_dict(
        {k[len('backbone.'):]: v
         for k, v in state_dict.items()}, strict=True)
    backbone.eval()
    io = load('biformer_mini_dense_io.pth')
    with torch.no_grad():
        outs = backbone(io['input'])
    for ours, official in zip(outs, io['stage_outputs']):
        assert max_diff(ours, official) <= TOL


def _meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(s, device='meta') for k, s in shapes.items()}


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_official_manifest_keys_map_exactly(manifest, arch):
    """Every key of the official tiny/small/base checkpoints maps onto the
    mmpretrain classifier (ImageNet) and the dense backbone, nothing
    missing or unexpected, shapes equal; param counts are the official."""
    from mmpretrain.registry import MODELS

    official = manifest['full_models'][f'biformer_{arch}']
    shapes = official['state_dict']

    with torch.device('meta'):
        classifier = MODELS.build(
            dict(
                type='ImageClassifier',
                backbone=dict(type='BiFormer', arch=arch),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(
                    type='LinearClsHead',
                    num_classes=1000,
                    in_channels=shapes['head.weight'][1])))
        dense = BiFormer(arch=arch, out_indices=(0, 1, 2, 3))
    assert sum(p.numel() for p in classifier.parameters()) == \
        official['params']

    converted, fmt = convert_official_checkpoint(
        {'model': _meta_state_dict(shapes)})
    assert fmt == OFFICIAL_IN1K
    own = {k: list(v.shape) for k, v in classifier.state_dict().items()}
    got = {k: list(v.shape) for k, v in converted['state_dict'].items()}
    assert sorted(set(own) - set(got)) == []  # missing
    assert sorted(set(got) - set(own)) == []  # unexpected
    assert got == own

    # the official dense layout: no norm/head, extra_norms per output
    dense_official = {
        'backbone.' + k: v
        for k, v in shapes.items() if not k.startswith(('norm.', 'head.'))
    }
    for i, width in enumerate(dense.embed_dims):
        for p in ('weight', 'bias'):
            dense_official[f'backbone.extra_norms.{i}.{p}'] = [width]
    converted, fmt = convert_official_checkpoint(
        {'state_dict': _meta_state_dict(dense_official)})
    assert fmt == OFFICIAL_DENSE
    own = {
        'backbone.' + k: list(v.shape)
        for k, v in dense.state_dict().items()
    }
    got = {k: list(v.shape) for k, v in converted['state_dict'].items()}
    assert got == own
