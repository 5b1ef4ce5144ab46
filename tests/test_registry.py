"""Registration of BiFormer into mmpretrain, mmdet and mmseg, and of the
attention op into mmengine."""
import importlib

import pytest
import torch

pytest.importorskip('mmengine')

from mini_arch import MINI  # noqa: E402

import mmbiformer  # noqa: E402,F401
from mmbiformer import registry  # noqa: E402
from mmbiformer.models import BiFormer  # noqa: E402
from mmbiformer.ops import BiLevelRoutingAttention  # noqa: E402

TOOLBOXES = ['mmpretrain', 'mmdet', 'mmseg']


def toolbox_models(package: str):
    pytest.importorskip(package)
    return importlib.import_module(f'{package}.registry').MODELS


@pytest.mark.parametrize('package', TOOLBOXES)
def test_each_registry_builds_the_same_class(package):
    models = toolbox_models(package)
    assert package in registry.REGISTERED_IN
    assert models.get('BiFormer') is BiFormer
    model = models.build(
        dict(type='BiFormer', arch=MINI, n_win=4, out_indices=(0, 1, 2, 3)))
    assert type(model) is BiFormer
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 16, 16),
                                             (1, 64, 8, 8),
                                             (1, 128, 4, 4),
                                             (1, 256, 2, 2)]


@pytest.mark.parametrize('package', TOOLBOXES)
def test_default_scope_resolves_biformer(package):
    """Inside a toolbox's default scope the root registry builds it."""
    from mmengine.registry import MODELS, DefaultScope
    toolbox_models(package)
    with DefaultScope.overwrite_default_scope(package):
        model = MODELS.build(dict(type='BiFormer', arch=MINI))
    assert type(model) is BiFormer


@pytest.mark.parametrize('package', TOOLBOXES)
def test_registry_builds_with_auto_pad_odd_size(package):
    models = toolbox_models(package)
    model = models.build(
        dict(
            type='BiFormer',
            arch=MINI,
            out_indices=(0, 1, 2, 3),
            auto_pad=True)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 97, 131))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 25, 33),
                                             (1, 64, 13, 17),
                                             (1, 128, 7, 9),
                                             (1, 256, 4, 5)]


def test_op_registered_in_mmengine():
    from mmengine.registry import MODELS
    assert MODELS.get('BiLevelRoutingAttention') is BiLevelRoutingAttention
    op = MODELS.build(dict(type='BiLevelRoutingAttention', dim=32,
                           num_heads=1, n_win=2, topk=1))
    assert isinstance(op, BiLevelRoutingAttention)


def test_reimport_registers_nothing_twice():
    before = {
        p: len(toolbox_models(p).module_dict)
        for p in TOOLBOXES if importlib.util.find_spec(p)
    }
    importlib.reload(registry)
    after = {p: len(toolbox_models(p).module_dict) for p in before}
    assert before == after
    for package in before:
        assert toolbox_models(package).get('BiFormer') is BiFormer


STOCK_CLS = """
custom_imports = dict(imports=['mmbiformer'], allow_failed_imports=False)
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='BiFormer', arch='small'),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=512))
"""

STOCK_SEG = """
custom_imports = dict(imports=['mmbiformer'], allow_failed_imports=False)
default_scope = 'mmseg'
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
    backbone=dict(
        type='BiFormer',
        arch=dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                  head_dim=32, mlp_ratios=[3, 3, 3, 3], topks=[1, 4, 16, -2]),
        n_win=8, out_indices=(0, 1, 2, 3), auto_pad=True),
    decode_head=dict(type='FCNHead', in_channels=256, in_index=3,
                     channels=16, num_convs=1, num_classes=3))
"""


def _build_from_file(tmp_path, text):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    pytest.importorskip(cfg.default_scope)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model)


def test_stock_classifier_config_with_arch_name(tmp_path):
    """``backbone=dict(type='BiFormer', arch='small')`` in an mmpretrain
    config with ``custom_imports``."""
    with torch.device('meta'):
        model = _build_from_file(tmp_path, STOCK_CLS)
    assert type(model.backbone) is BiFormer
    assert model.backbone.depths == [4, 4, 18, 4]
    assert sum(p.numel() for p in model.parameters()) == 25_536_232


def test_stock_segmentor_config(tmp_path):
    model = _build_from_file(tmp_path, STOCK_SEG).eval()
    assert type(model.backbone) is BiFormer
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 90))  # mode='tensor'
    assert out.shape == (1, 3, 3, 3)


def test_stock_flop_counter_counts_fused_ops():
    """After ``import mmbiformer`` mmengine's stock complexity tool counts
    the fused routing attention and SDPA like every other backend."""
    from mmengine.analysis import get_model_complexity_info

    from mmbiformer.models import flop_analysis
    model = BiFormer(arch=MINI, attn_backend='torch').eval()
    stock = get_model_complexity_info(
        model, input_shape=(3, 224, 224), show_table=False,
        show_arch=False)['flops']
    model.attn_backend = 'official'
    ours, _ = flop_analysis(model, torch.randn(1, 3, 224, 224),
                            bn_convention='eval')
    assert stock == ours
