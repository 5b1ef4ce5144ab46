"""BiFormer-STL and BiFormer-STL-nchw (``arch='stl'``, ``'stl_nchw'``)
against the official ablation models.

The reference outputs are in ``../shared/fixtures/official`` (see its
README): mini models of both in the official ImageNet format, their outputs
at 224x224 and, for STL-nchw, at 250x330 (a size the region grid does not
divide, where its own padding rules apply), and the keys and parameter
count of the full-size models.
"""
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmengine')
pytest.importorskip('mmpretrain')

import mmbiformer  # noqa: E402,F401  (registers BiFormer)
from mmbiformer.models import BiFormer  # noqa: E402
from mmbiformer.models.checkpoint import (  # noqa: E402
    OFFICIAL_IN1K,
    convert_official_checkpoint,
    load_biformer_checkpoint,
)
from mmbiformer.models.complexity import (  # noqa: E402
    count_params,
    flop_analysis,
)

from .official import FIXTURES, REPO, TOL, load  # noqa: E402,F401
from .official import needs_fixtures as pytestmark  # noqa: E402,F401

ARCHS = ('stl', 'stl_nchw')
#: the published counts (paper: 28.4 M, 4.6 G); FLOPs as for T/S/B
#: (fvcore, BatchNorm as in training mode)
STL_PARAMS = 28_372_552
STL_FLOPS = 4_592_539_968


def mini_arch(arch: str) -> dict:
    """The arch of the fixtures' mini models: the full arch's kind with
    smaller depths, widths and MLP ratio."""
    return dict(BiFormer.arch_zoo[arch], embed_dims=[32, 64, 128, 256],
                depths=[1, 1, 2, 1], mlp_ratios=[2, 2, 2, 2])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def classifier(arch, backend: str = 'official', **kwargs):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    width = arch['embed_dims'][-1] if isinstance(arch, dict) else 768
    classes = 10 if isinstance(arch, dict) else 1000
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(
            dict(type='ImageClassifier',
                 backbone=dict(type='BiFormer', arch=arch,
                               attn_backend=backend, **kwargs),
                 neck=dict(type='GlobalAveragePooling'),
                 head=dict(type='LinearClsHead', num_classes=classes,
                           in_channels=width)))


def stage_outputs(model, x: torch.Tensor):
    """Logits (or backbone output) and the output of every stage's last
    block (before the out-norm)."""
    backbone = getattr(model, 'backbone', model)
    outs = []
    hooks = [stage[-1].register_forward_hook(
        lambda m, i, o: outs.append(o)) for stage in backbone.stages]
    try:
        with torch.no_grad():
            result = model(x)
    finally:
        for h in hooks:
            h.remove()
    return result, outs


def test_fixture_configs_match_mini_archs(manifest):
    for arch in ARCHS:
        cfg = manifest['configs'][f'{arch}_mini']
        ours = mini_arch(arch)
        assert cfg['embed_dim'] == ours['embed_dims']
        assert cfg['depth'] == ours['depths']
        assert cfg['mlp_ratios'] == ours['mlp_ratios']
        assert cfg['head_dim'] == ours['head_dim']
        assert cfg['n_wins'] == [7] * 4 and cfg['side_dwconv'] == 5
        # STL-nchw's -1 is its global attention with LePE: our -2
        assert cfg['topks'][:3] == ours['topks'][:3]
        assert ours['topks'][3] == -2


def converted_classifier(tmp_path, arch: str, backend: str, cli: bool):
    """The official mini checkpoint, converted by the CLI tool (or in
    memory), loaded strictly into an mmpretrain classifier."""
    src = FIXTURES / f'biformer_{arch}_mini_official.pth'
    if cli:
        dst = tmp_path / f'{arch}_mm.pth'
        subprocess.run([
            sys.executable,
            str(REPO / 'tools' / 'model_converters' /
                'biformer_official2mm.py'), str(src), str(dst)
        ], check=True, capture_output=True, text=True)
        converted = torch.load(dst, weights_only=True)
    else:
        converted, fmt = convert_official_checkpoint(load(src.name))
        assert fmt == OFFICIAL_IN1K
    model = classifier(mini_arch(arch), backend, n_win=7, auto_pad=True)
    model.load_state_dict(converted['state_dict'], strict=True)
    return model.eval()


@pytest.mark.parametrize('arch,backend,cli', [
    ('stl', 'official', True), ('stl', 'torch', False),
    ('stl', 'auto', False), ('stl_nchw', 'official', True),
    ('stl_nchw', 'torch', False), ('stl_nchw', 'auto', False)])
def test_official_stl_mini_classifier(tmp_path, arch, backend, cli):
    """The converted official checkpoint reproduces the official logits and
    every stage output (STL-nchw also at 250x330)."""
    model = converted_classifier(tmp_path, arch, backend, cli)
    io = load(f'biformer_{arch}_mini_io.pth')
    sizes = [('input', 'logits', 'stage_outputs')]
    if arch == 'stl_nchw':
        sizes.append(('odd_input', 'odd_logits', 'odd_stage_outputs'))
    for inp, logits_key, stages_key in sizes:
        logits, outs = stage_outputs(model, io[inp])
        assert max_diff(logits, io[logits_key]) <= TOL
        assert len(outs) == 4
        for ours, official in zip(outs, io[stages_key]):
            assert max_diff(ours, official) <= TOL


def test_stl_nchw_odd_size_needs_its_own_rules(tmp_path):
    """At 250x330 the legacy padding (before the projection, n_win x n_win
    regions) gives other outputs: the STL-nchw rules are what match."""
    model = converted_classifier(tmp_path, 'stl_nchw', 'torch', cli=False)
    io = load('biformer_stl_nchw_mini_io.pth')
    for attn in model.backbone.routing_attentions():
        assert attn.pad_mode == 'after_qkv'
        attn.pad_mode = 'legacy'
    logits, _ = stage_outputs(model, io['odd_input'])
    assert max_diff(logits, io['odd_logits']) > 1e-3
    # at 224 (divisible maps) the modes agree
    logits, _ = stage_outputs(model, io['input'])
    assert max_diff(logits, io['logits']) <= TOL


@pytest.mark.parametrize('arch', ARCHS)
def test_official_stl_pretrained_init(arch):
    """``init_cfg=Pretrained`` on the official file (no conversion): the
    backbone's output with the official head gives the official logits."""
    path = str(FIXTURES / f'biformer_{arch}_mini_official.pth')
    backbone = BiFormer(arch=mini_arch(arch), auto_pad=True,
                        init_cfg=dict(type='Pretrained', checkpoint=path))
    backbone.init_weights()
    report = backbone.checkpoint_report
    assert report['format'] == OFFICIAL_IN1K
    assert report['missing'] == [] and report['unexpected'] == []
    assert report['shape_mismatch'] == []
    assert sorted(report['dropped']) == ['head.bias', 'head.weight']
    official = load(f'biformer_{arch}_mini_official.pth')['model']
    io = load(f'biformer_{arch}_mini_io.pth')
    backbone.eval()
    inputs = [('input', 'logits')]
    if arch == 'stl_nchw':
        inputs.append(('odd_input', 'odd_logits'))
    for inp, logits_key in inputs:
        with torch.no_grad():
            (feat, ) = backbone(io[inp])
        logits = feat.mean((2, 3)) @ official['head.weight'].t() + \
            official['head.bias']
        assert max_diff(logits, io[logits_key]) <= TOL


def test_stl_dense_outputs(tmp_path):
    """Both archs serve mmdet/mmseg: four LayerNorm'd outputs at an odd
    size with auto_pad, of the shapes ``output_shapes`` states."""
    for arch in ARCHS:
        backbone = BiFormer(arch=mini_arch(arch), out_indices=(0, 1, 2, 3),
                            auto_pad=True).eval()
        assert backbone.out_norm == 'ln'
        with torch.no_grad():
            outs = backbone(torch.randn(1, 3, 250, 330))
        assert [tuple(o.shape[1:]) for o in outs] == \
            backbone.output_shapes(250, 330) == \
            [(32, 62, 82), (64, 31, 41), (128, 15, 20), (256, 7, 10)]


def _meta_state_dict(shapes: dict) -> dict:
    return {k: torch.empty(s, device='meta') for k, s in shapes.items()}


@pytest.mark.parametrize('arch', ARCHS)
def test_official_stl_manifest_keys_map_exactly(manifest, arch):
    """Every key of the full-size official checkpoint maps onto the
    classifier of our arch, shapes equal; the parameter count is the
    official one."""
    official = manifest['full_models'][f'biformer_{arch}']
    assert official['params'] == STL_PARAMS
    with torch.device('meta'):
        model = classifier(arch)
    assert count_params(model) == official['params']
    converted, fmt = convert_official_checkpoint(
        {'model': _meta_state_dict(official['state_dict'])})
    assert fmt == OFFICIAL_IN1K
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    got = {k: list(v.shape) for k, v in converted['state_dict'].items()}
    assert sorted(set(own) - set(got)) == []  # missing
    assert sorted(set(got) - set(own)) == []  # unexpected
    assert got == own


def test_stl_flops():
    """4.59 GFLOPs at 224 for both (the paper's 4.6 G), counted as for
    BiFormer-T/S/B."""
    for arch in ARCHS:
        total, by_module = flop_analysis(classifier(arch),
                                         torch.randn(1, 3, 224, 224))
        assert total == STL_FLOPS
        assert round(total / 1e9, 2) == 4.59
        assert by_module['backbone.stages.0.0.attn'] > 0


def test_stl_checkpoint_into_other_arch_is_named(tmp_path):
    """An STL checkpoint for a BiFormer-T model: the error names both."""
    from mmbiformer.models.checkpoint import ArchitectureMismatchError

    path = tmp_path / 'stl_full.pth'
    torch.save({'model': classifier('stl').state_dict()}, path)
    with pytest.raises(ArchitectureMismatchError,
                       match='BiFormer-STL or BiFormer-STL-nchw'):
        load_biformer_checkpoint(BiFormer(arch='tiny'), str(path),
                                 prefix='backbone.')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_official_stl_mini_on_cuda(backend):
    """On a GPU, float32 without TF32: both STL minis (STL-nchw also at the
    odd size, where its padded square grid goes through the operator)."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for arch in ARCHS:
            path = str(FIXTURES / f'biformer_{arch}_mini_official.pth')
            backbone = BiFormer(arch=mini_arch(arch), auto_pad=True,
                                attn_backend=backend,
                                init_cfg=dict(type='Pretrained',
                                              checkpoint=path))
            backbone.init_weights()
            backbone = backbone.cuda().eval()
            io = load(f'biformer_{arch}_mini_io.pth')
            inputs = [('input', 'stage_outputs')]
            if arch == 'stl_nchw':
                inputs.append(('odd_input', 'odd_stage_outputs'))
            for inp, key in inputs:
                _, outs = stage_outputs(backbone, io[inp].cuda())
                for ours, official in zip(outs, io[key]):
                    assert max_diff(ours.cpu(), official) <= TOL
    finally:
        (torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = tf32
