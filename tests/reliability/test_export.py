"""Issue #7, export: the backbone (routing-attention stages included)
exports with ``torch.export`` and to ONNX, and the exported model matches
eager within 1e-4 at two input sizes, from one dynamic-shape export.

See :mod:`mmbiformer.models.export` and ``tools/deployment/export.py``.
"""
import importlib.util
import os.path as osp

import pytest
import torch

from mmbiformer.models.export import (
    describe_ranges,
    export_backbone,
    max_abs_diff,
    min_dynamic_side,
    prepare_for_export,
    run_exported,
    save_exported,
)

from .conftest import MINI, make_mini

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ATOL = 1e-4
#: (batch, height, width): the export size, then one that is not a
#: multiple of any stage's region grid
SIZES = [(1, 224, 224), (2, 256, 320)]


@pytest.fixture(scope='module')
def dynamic_export(mini_state):
    """One dynamic-shape export of the mini backbone (legacy padding, as
    the official models) at 224x224."""
    model = make_mini(mini_state)  # auto_pad=False, attn_backend='auto'
    changed = prepare_for_export(model, dynamic=True)
    assert changed == dict(auto_pad=True, backend=None)
    return model, export_backbone(model, 224, 224, dynamic=True)


def _check(model, run, sizes, seed=0):
    """Exported vs eager on seeded random inputs of each size."""
    gen = torch.Generator().manual_seed(seed)
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w, generator=gen)
        with torch.no_grad():
            expected = model(x)
        actual = run(x)
        diff = max_abs_diff(expected, actual)
        # on failure: per output, the largest difference and the share of
        # elements off by more than ATOL (a flipped top-k routing choice
        # would show as a small share)
        detail = [(round((e - a).abs().max().item(), 7),
                   round(((e - a).abs() > ATOL).float().mean().item(), 5))
                  for e, a in zip(expected, actual)]
        assert diff <= ATOL, (b, h, w, diff, detail)


def test_export_torch_dynamic_matches_eager_at_two_sizes(dynamic_export):
    model, program = dynamic_export
    ranges = describe_ranges(program)
    assert 'batch >= 1' in ranges and 'height >=' in ranges
    module = program.module()
    _check(model, lambda x: tuple(module(x)), SIZES)


def test_export_torch_dynamic_rejects_sizes_outside_its_range(
        dynamic_export):
    """Outside the sizes torch.export proved it for, the program raises
    instead of returning something wrong."""
    model, program = dynamic_export
    assert min_dynamic_side(model) == 113  # n_win 7 x stride 16, plus 1
    module = program.module()
    for h, w in [(32, 32), (112, 224), (224, 112)]:
        with pytest.raises((AssertionError, RuntimeError),
                           match='Guard failed'):
            module(torch.randn(1, 3, h, w))
    _check(model, lambda x: tuple(module(x)), [(1, 113, 113)])


def test_export_dynamic_example_too_small_is_refused(mini_state):
    model = make_mini(mini_state)
    prepare_for_export(model, dynamic=True)
    with pytest.raises(ValueError, match='at least 113x113'):
        export_backbone(model, 112, 224, dynamic=True)


def test_export_onnx_dynamic_matches_eager_at_two_sizes(
        mini_state, tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    pytest.importorskip('onnxruntime')
    import onnx
    model = make_mini(mini_state)
    # ONNX has no BRA operator: the plain-torch 'official' backend
    changed = prepare_for_export(model, dynamic=True, fmt='onnx')
    assert changed == dict(auto_pad=True, backend='official')
    program = export_backbone(model, 224, 224, dynamic=True)
    path = save_exported(program, str(tmp_path / 'mini.onnx'), 'onnx',
                         model)
    graph = onnx.load(path).graph
    assert [o.name for o in graph.output] == ['feat0', 'feat1', 'feat2',
                                             'feat3']
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField('dim_value') for d in dims] == [False, True, False,
                                                       False]
    # the two sizes, and sizes below the torch.export range: the ONNX
    # graph is correct there too (it has no size guards to reject them)
    _check(model, lambda x: run_exported(path, 'onnx', x),
           SIZES + [(1, 32, 32), (1, 64, 1024)])


def test_export_padding_is_unconditional_only_while_exporting(mini_state):
    """Eager results do not depend on the export path: a model prepared for
    export gives the same output as the plain one (auto_pad)."""
    plain = make_mini(mini_state, auto_pad=True)
    prepared = make_mini(mini_state)
    prepare_for_export(prepared, dynamic=True)
    x = torch.randn(1, 3, 100, 130)
    with torch.no_grad():
        assert max_abs_diff(plain(x), prepared(x)) <= 1e-5


def _export_tool():
    spec = importlib.util.spec_from_file_location(
        'export_tool', osp.join(REPO, 'tools', 'deployment', 'export.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_export_tool_static_default_backend(tmp_path, mini_state, capsys):
    """The CLI on a config: a static export with the config's backend
    ('auto', the registered operator), weights from a checkpoint, checked
    against eager."""
    cfg = tmp_path / 'mini_cfg.py'
    cfg.write_text(
        f"model = dict(type='ImageClassifier', backbone=dict(type='BiFormer', "
        f"arch={MINI!r}, out_indices=(1, 3)))\n")
    ckpt = str(tmp_path / 'w.pth')
    torch.save({'state_dict': {'backbone.' + k: v
                               for k, v in mini_state.items()}}, ckpt)
    out = str(tmp_path / 'mini.pt2')
    tool = _export_tool()
    rc = tool.main([
        str(cfg), '--format', 'torch', '--shape', '112', '112', '--out', out,
        '--checkpoint', ckpt
    ])
    log = capsys.readouterr().out
    assert rc == 0, log
    assert 'input 1x3x112x112: max |exported - eager|' in log
    assert '[export] OK' in log
    program = torch.export.load(out)
    outs = program.module()(torch.randn(1, 3, 112, 112))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 14, 14), (1, 256, 4, 4)]
    # a config whose backbone is not BiFormer is refused by name
    bad = tmp_path / 'bad_cfg.py'
    bad.write_text("model = dict(backbone=dict(type='ResNet', depth=50))\n")
    with pytest.raises(ValueError, match="'ResNet', not BiFormer"):
        tool.main([str(bad), '--out', out])
