"""Issue #7, bad input: a clear error or a correct result, never a silent
wrong one. The behaviours tested here are documented in the ``BiFormer``
docstring ("Bad input")."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbiformer.models import BiFormer
from mmbiformer.ops import BACKENDS, BiLevelRoutingAttention

from .conftest import MINI, make_mini


def _expected_shapes(model, n, h, w):
    return [(n, c, math.ceil(h / 2**(i + 2)), math.ceil(w / 2**(i + 2)))
            for i, c in zip(model.out_indices, MINI['embed_dims'])]


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize('pad_mode', ['legacy', 'masked'])
@pytest.mark.parametrize(
    'n, h, w',
    [
        (2, 100, 130),  # not a multiple of the region grid anywhere
        (1, 32, 32),  # smaller than the 7x7 region grid from stage 1 on
        (1, 64, 1024),  # very elongated
        (1, 1024, 64),
        (1, 5, 3),  # a few pixels
    ])
def test_bad_input_sizes_with_auto_pad_give_finite_outputs(
        mini_state, pad_mode, n, h, w):
    model = make_mini(mini_state, auto_pad=True, pad_mode=pad_mode)
    with torch.no_grad():
        outs = model(torch.randn(n, 3, h, w))
    assert [tuple(o.shape) for o in outs] == _expected_shapes(model, n, h, w)
    assert [tuple(o.shape[1:]) for o in outs] == model.output_shapes(h, w)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('h, w', [(100, 130), (32, 32), (64, 1024)])
def test_bad_input_sizes_without_auto_pad_raise_naming_the_fix(
        mini_state, h, w):
    model = make_mini(mini_state)
    with pytest.raises(ValueError, match=r'auto_pad=True.*multiples of 112'):
        model(torch.randn(1, 3, h, w))


def test_bad_input_auto_pad_is_a_no_op_on_grid_multiples(mini_state):
    plain, padded = make_mini(mini_state), make_mini(mini_state,
                                                     auto_pad=True)
    x = torch.randn(1, 3, 112, 224)
    with torch.no_grad():
        for a, b in zip(plain(x), padded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_auto_pad_equals_explicit_padding_of_the_attention():
    """auto_pad (legacy) is exactly: zero-pad the attention's input to the
    region grid, run the attention, crop (the official behaviour)."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(64, num_heads=2, n_win=4, topk=3,
                                   auto_pad=True, backend='torch').eval()
    x = torch.randn(2, 10, 13, 64)
    with torch.no_grad():
        out = attn(x)
        attn.auto_pad = False
        ref = attn(F.pad(x, (0, 0, 0, 3, 0, 2)))[:, :10, :13]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize('h, w', [(100, 130), (224, 224)])
def test_bad_input_batch_of_one_matches_its_row_in_a_batch(
        mini_state, h, w):
    """Images do not interact in eval mode: a batch of 1 gives the same
    result as the same image inside a batch (padding included)."""
    model = make_mini(mini_state, auto_pad=True)
    x = torch.randn(3, 3, h, w)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    for b, s in zip(batched, single):
        torch.testing.assert_close(b[1:2], s, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- shape and dtype
def test_bad_input_wrong_channel_count(mini_state):
    model = make_mini(mini_state)
    with pytest.raises(ValueError,
                       match=r'in_channels=3\) got an input with 1 channels'):
        model(torch.randn(1, 1, 224, 224))
    # channels-last by mistake
    with pytest.raises(ValueError, match='224 channels'):
        model(torch.randn(1, 224, 224, 3))
    gray = make_mini(in_channels=1)
    assert gray(torch.randn(1, 1, 112, 112))[0].shape == (1, 32, 28, 28)


def test_bad_input_wrong_rank(mini_state):
    model = make_mini(mini_state)
    with pytest.raises(ValueError, match=r'4-D batch.*x\[None\]'):
        model(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match='4-D batch'):
        model(torch.randn(1, 1, 3, 224, 224))
    with pytest.raises(TypeError, match='expects a tensor'):
        model([torch.randn(3, 224, 224)])


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64, torch.bool])
def test_bad_input_integer_dtype_says_convert_with_float(mini_state, dtype):
    model = make_mini(mini_state)
    x = torch.zeros(1, 3, 112, 112, dtype=dtype)
    with pytest.raises(TypeError, match=r'convert it with \.float\(\)'):
        model(x)


@pytest.mark.parametrize('dtype',
                         [torch.float64, torch.float16, torch.bfloat16])
def test_bad_input_float_dtype_mismatch_names_both_dtypes(mini_state, dtype):
    model = make_mini(mini_state)
    with pytest.raises(TypeError,
                       match=f'{dtype}.*weights are torch.float32.*autocast'):
        model(torch.randn(1, 3, 112, 112).to(dtype))


def test_bad_input_matching_dtypes_and_autocast_are_accepted(mini_state):
    x = torch.randn(1, 3, 112, 112)
    model = make_mini(mini_state).to(torch.float64)
    assert model(x.double())[0].dtype == torch.float64
    model = make_mini(mini_state)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(x)[0].dtype == torch.bfloat16
        assert model(x.bfloat16())[0].dtype == torch.bfloat16
        with pytest.raises(TypeError, match='float64'):
            model(x.double())


@pytest.mark.parametrize('train', [False, True])
def test_bad_input_empty_batch_gives_empty_outputs(mini_state, train):
    model = make_mini(mini_state, auto_pad=True).train(train)
    stats = model.downsample_layers[0][1].running_mean.clone()
    outs = model(torch.randn(0, 3, 100, 130))
    assert [tuple(o.shape) for o in outs] == _expected_shapes(
        model, 0, 100, 130)
    torch.testing.assert_close(model.downsample_layers[0][1].running_mean,
                               stats)


def test_bad_input_empty_image_raises(mini_state):
    model = make_mini(mini_state, auto_pad=True)
    with pytest.raises(ValueError, match='empty image'):
        model(torch.randn(1, 3, 0, 64))


# --------------------------------------------------------------- NaN/Inf
@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_bad_input_non_finite_input_documented_result(mini_state, value):
    """Default (documented): no scan; the bad image's outputs are NaN, the
    other images' outputs are exactly what they are alone (eval mode)."""
    model = make_mini(mini_state, auto_pad=True)
    x = torch.randn(2, 3, 60, 90)
    x[0, 1, 40, 50] = value
    with torch.no_grad():
        outs = model(x)
        alone = model(x[1:])
    for o, a in zip(outs, alone):
        assert torch.isnan(o[0]).any()
        assert torch.isfinite(o[1]).all()
        torch.testing.assert_close(o[1:], a, rtol=1e-4, atol=1e-5)


def test_bad_input_non_finite_input_in_training_spreads_through_batchnorm(
        mini_state):
    """Documented: in training mode BatchNorm statistics mix the images,
    so one NaN image makes the whole batch and the running stats NaN."""
    model = make_mini(mini_state, auto_pad=True).train()
    x = torch.randn(2, 3, 64, 64)
    x[0, 0, 0, 0] = float('nan')
    outs = model(x)
    assert torch.isnan(outs[0][1]).all()
    assert torch.isnan(model.downsample_layers[0][1].running_mean).all()


def test_bad_input_check_finite_raises_naming_the_images(mini_state):
    model = make_mini(mini_state, auto_pad=True, check_finite=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = make_mini(mini_state, auto_pad=True)(x)
        for o, r in zip(model(x), ref):  # finite input: same result
            torch.testing.assert_close(o, r, rtol=0, atol=0)
    x[0, 0, 0, 0] = float('nan')
    x[2, 2, 5, 5] = -float('inf')
    with pytest.raises(ValueError, match=r'NaN or Inf in images \[0, 2\]'):
        model(x)


# ------------------------------------------------------------ build time
BUILD_ERRORS = [
    (dict(arch='huge'),
     r"arch 'huge'; choose one of \['b', 'base', 's', 'small', 'stl', "
     r"'stl_nchw', 't', 'tiny'\]"),
    (dict(arch=MINI, n_win=0), r'n_win must be a positive int.*got 0'),
    (dict(arch=MINI, n_win=-2), r'n_win must be a positive int.*got -2'),
    (dict(arch=MINI, n_win=7.0), r'n_win must be a positive int.*got 7\.0'),
    (dict(arch=MINI, n_win=3),
     r'topks\[2\]=16 .* n_win\*\*2=9 of n_win=3; use n_win >= 4 or '
     r'topks\[2\] <= 9'),
    (dict(arch=dict(MINI, topks=[1, 50, 16, -2]), n_win=7),
     r'topks\[1\]=50 .*n_win\*\*2=49.*use n_win >= 8'),
    (dict(arch=MINI, attn_backend='cuda'),
     r"backend='cuda' is not supported; choose one of \('auto', 'cpu', "
     r"'triton', 'torch', 'official', 'reference', 'flex'\)"),
    (dict(arch=MINI, pad_mode='zeros'),
     r"pad_mode='zeros' is not supported; choose one of \('legacy', "
     r"'masked', 'after_qkv'\)"),
    (dict(arch=MINI, in_channels=0), r'in_channels must be a positive int'),
]


@pytest.mark.parametrize('kwargs, message', BUILD_ERRORS)
def test_bad_input_config_errors_at_build_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiFormer(**kwargs)


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
@pytest.mark.parametrize('kwargs, message', [BUILD_ERRORS[i]
                                             for i in (0, 1, 4, 6)])
def test_bad_input_config_errors_through_the_toolbox_registries(
        scope, kwargs, message):
    registry = pytest.importorskip(f'{scope}.registry')
    with pytest.raises(ValueError, match=message):
        # mmengine re-raises build errors with the class name prepended
        registry.MODELS.build(dict(type='BiFormer', **kwargs))


def test_bad_input_topk_at_the_limit_and_global_only_archs_build():
    BiFormer(arch=MINI, n_win=4)  # topk 16 == 4**2 regions
    # no routing stage: n_win is unused and not checked
    BiFormer(arch=dict(MINI, topks=[-1, -1, -2, -2]), n_win=0)


def test_bad_input_attn_backend_setter_checks(mini_state):
    model = make_mini(mini_state)
    with pytest.raises(ValueError, match='choose one of'):
        model.attn_backend = 'flash'
    for backend in BACKENDS:
        model.attn_backend = backend
        assert model.attn_backend == backend
