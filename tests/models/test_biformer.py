"""The BiFormer backbone: construction, shapes, backends, training modes."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip('mmengine')
pytest.importorskip('mmcv')

from mini_arch import MINI  # noqa: E402

from mmbiformer.models import BiFormer, LayerNorm2d  # noqa: E402
from mmbiformer.ops import BACKENDS, triton_available  # noqa: E402

OFFICIAL_PARAMS = {'tiny': 13_142_760, 'small': 25_536_232,
                   'base': 56_804_968}


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_official_param_counts(arch):
    with torch.device('meta'):
        model = BiFormer(arch=arch)
    head = model.embed_dims[-1] * 1000 + 1000  # 1000-class Linear head
    params = sum(p.numel() for p in model.parameters()) + head
    assert params == OFFICIAL_PARAMS[arch]


def test_arch_validation():
    with pytest.raises(ValueError, match=r"\['b', 'base', 's', 'small'"):
        BiFormer(arch='huge')
    with pytest.raises(ValueError, match=r"missing \['topks'\]"):
        BiFormer(arch={k: v for k, v in MINI.items() if k != 'topks'})
    with pytest.raises(ValueError, match=r"unknown \['num_heads'\]"):
        BiFormer(arch=dict(MINI, num_heads=[1, 2, 4, 8]))
    with pytest.raises(ValueError, match='sequence of 4'):
        BiFormer(arch=dict(MINI, depths=[1, 1, 1]))
    with pytest.raises(ValueError, match='topks'):
        BiFormer(arch=dict(MINI, topks=[1, 4, 16, 0]))
    with pytest.raises(ValueError, match='out_indices'):
        BiFormer(arch=MINI, out_indices=(4, ))
    with pytest.raises(ValueError, match='out_norm'):
        BiFormer(arch=MINI, out_norm='gn')


def test_custom_qk_dims_and_arch_zoo_aliases():
    model = BiFormer(arch=dict(MINI, qk_dims=[32, 64, 64, 256]))
    attn = model.stages[2][0].attn
    assert attn.qk_dim == 64 and attn.num_heads == 4 and attn.topk == 16
    assert BiFormer(arch='t').depths == [2, 2, 8, 2]


def test_out_indices_and_out_norms():
    model = BiFormer(arch=MINI, out_indices=-1)
    assert model.out_indices == (3, ) and model.out_norm == 'bn'
    assert isinstance(model.norm3, nn.BatchNorm2d)
    model = BiFormer(arch=MINI, out_indices=(-4, 1, 2, -1))
    assert model.out_indices == (0, 1, 2, 3) and model.out_norm == 'ln'
    for i in range(4):
        norm = getattr(model, f'norm{i}')
        assert isinstance(norm, LayerNorm2d) and norm.eps == 1e-6
    model = BiFormer(arch=MINI, out_indices=(1, 3), out_norm=None)
    assert isinstance(model.norm1, nn.Identity)
    assert not hasattr(model, 'norm0')


def test_structure_follows_official():
    model = BiFormer(arch=MINI, drop_path_rate=0.4)
    stem = model.downsample_layers[0]
    assert [type(m) for m in stem] == [
        nn.Conv2d, nn.BatchNorm2d, nn.GELU, nn.Conv2d, nn.BatchNorm2d
    ]
    assert stem[0].out_channels == 16 and stem[0].stride == (2, 2)
    block = model.stages[0][0]
    assert block.pos_embed.groups == 32 and block.pos_embed.kernel_size == (
        3, 3)
    assert block.norm1.eps == 1e-6 and block.mlp[0].out_features == 96
    assert block.attn.num_heads == 1 and block.attn.topk == 1
    assert model.stages[1][0].attn.topk == 4
    last = model.stages[3][0].attn
    assert last.num_heads == 8 and last.qkv.bias is None
    assert last.lepe.kernel_size == (5, 5)
    # linear stochastic depth over all 5 blocks
    rates = [
        0. if isinstance(b.drop_path, nn.Identity) else b.drop_path.drop_prob
        for stage in model.stages for b in stage
    ]
    assert rates == pytest.approx([0., .1, .2, .3, .4])


def test_default_init_is_official():
    model = BiFormer(arch=MINI)
    model.init_weights()
    fc = model.stages[2][1].mlp[0]
    assert fc.bias.abs().max() == 0
    assert fc.weight.abs().max() <= 2.  # trunc_normal(std .02, a=-2, b=2)
    assert 0.018 < fc.weight.std() < 0.022
    assert model.stages[3][0].attn.proj.bias.abs().max() == 0
    norm = model.stages[1][0].norm1
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


@pytest.mark.parametrize('size,pad_mode', [((97, 131), 'legacy'),
                                           ((97, 131), 'masked'),
                                           ((250, 330), 'legacy')])
def test_odd_input_sizes_with_auto_pad(size, pad_mode):
    torch.manual_seed(0)
    model = BiFormer(
        arch=MINI, n_win=7, out_indices=(0, 1, 2, 3), auto_pad=True,
        pad_mode=pad_mode).eval()
    assert {m.pad_mode for m in model.routing_attentions()} == {pad_mode}
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    shapes = [tuple(o.shape[1:]) for o in outs]
    assert shapes == model.output_shapes(*size)
    h, w = size
    assert shapes[0] == (32, -(-h // 4), -(-w // 4))
    assert shapes[3] == (256, -(-h // 32), -(-w // 32))


def test_odd_input_without_auto_pad_raises():
    model = BiFormer(arch=MINI, n_win=7).eval()
    with pytest.raises(ValueError, match='auto_pad=True'):
        model(torch.randn(1, 3, 97, 131))
    # 28 = 7 x 4 suits stage 1 only; stage 3 (stride 16) needs 112
    with pytest.raises(ValueError, match='stage 3 .* multiples of 112'):
        model(torch.randn(1, 3, 56, 56))


@pytest.fixture(scope='module')
def mini_state():
    torch.manual_seed(0)
    model = BiFormer(arch=MINI, n_win=7, out_indices=(0, 1, 2, 3))
    model.init_weights()
    # non-trivial norms and biases
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    return model.state_dict()


@pytest.mark.parametrize('backend', [
    b for b in BACKENDS if b not in ('official', 'triton')
] + (['triton'] if triton_available() else []))
def test_every_backend_gives_the_same_output(mini_state, backend):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 112, 140)
    outs = {}
    for name in ('official', backend):
        model = BiFormer(
            arch=MINI, n_win=7, out_indices=(0, 1, 2, 3),
            attn_backend=name, auto_pad=True)
        model.load_state_dict(mini_state)
        model.eval()
        assert model.attn_backend == name
        with torch.no_grad():
            outs[name] = model(x)
    for a, b in zip(outs['official'], outs[backend]):
        assert (a - b).abs().max() <= 1e-5


def test_attn_backend_setter(mini_state):
    model = BiFormer(arch=MINI, attn_backend='official')
    model.attn_backend = 'torch'
    assert {m.backend for m in model.routing_attentions()} == {'torch'}
    with pytest.raises(ValueError, match="'gather' was merged into 'torch'"):
        model.attn_backend = 'gather'
    assert len(model.routing_attentions()) == 4  # stages 1-3 only


def test_with_cp_same_gradients(mini_state):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 112, 112)
    grads = []
    for with_cp in (False, True):
        model = BiFormer(
            arch=MINI,
            out_indices=(0, 1, 2, 3),
            with_cp=with_cp,
            attn_backend='torch')
        model.load_state_dict(mini_state)
        model.train()
        sum(o.sum() for o in model(x.clone().requires_grad_())).backward()
        grads.append(model.stages[1][0].attn.qkv.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_frozen_stages_and_norm_eval():
    model = BiFormer(
        arch=MINI, out_indices=(0, 1, 2, 3), frozen_stages=2,
        norm_eval=True)
    model.train()
    for i in range(2):
        assert not model.downsample_layers[i].training
        assert not model.stages[i].training
        assert not getattr(model, f'norm{i}').training
        assert all(not p.requires_grad
                   for p in model.stages[i].parameters())
    assert model.stages[2].training
    assert all(p.requires_grad for p in model.stages[2].parameters())
    # norm_eval: BatchNorm layers of unfrozen stages stay in eval mode
    assert not model.downsample_layers[3][1].training
    assert model.stages[3][0].norm1.training




def test_dense_outputs_are_nchw_contiguous_for_mmcv_roi_align():
    # mmcv's RoIAlign reads its input's memory as NCHW whatever the strides:
    # channels-last maps (BiFormer's own layout, kept by the FPN's convs)
    # pooled the wrong values
    from mmcv.ops import RoIAlign
    from mmdet.models.necks import FPN
    torch.manual_seed(0)
    model = BiFormer(arch=MINI, out_indices=(0, 1, 2, 3), n_win=4).eval()
    neck = FPN([32, 64, 128, 256], 16, 4).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 128))
        assert all(o.is_contiguous() for o in outs)
        feat = neck(outs)[0]
        rois = torch.tensor([[0., 4., 4., 40., 48.]])
        pool = RoIAlign((4, 4), 0.25, 2)
        torch.testing.assert_close(pool(feat, rois),
                                   pool(feat.contiguous(), rois))
