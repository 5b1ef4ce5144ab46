"""Token labeling: MixToken invariants, the loss against a hand
computation, the test-time score, parameter counts, the teacher's label
files and loading a token-labeling checkpoint into a dense backbone."""
import math
import os.path as osp

import pytest
import torch
import torch.nn as nn
from mini_arch import MINI
from mmpretrain.structures import DataSample

import mmbiformer  # noqa: F401
from mmbiformer.models import BiFormer
from mmbiformer.models.token_labeling import (
                                              MixToken,
                                              TokenBox,
                                              TokenLabelClassifier,
                                              TokenLabelClsHead,
                                              TokenLabelLoss,
                                              swap_in_box,
)


def test_box_is_whole_tokens_and_lam_is_one_minus_area():
    torch.manual_seed(0)
    mix = MixToken(alpha=1., token_stride=8)
    lams = []
    for _ in range(300):
        box = mix.sample_box(7, 7)
        assert 0 <= box.x1 <= box.x2 <= 7 and 0 <= box.y1 <= box.y2 <= 7
        assert all(isinstance(v, int) for v in (box.x1, box.x2, box.y1,
                                                box.y2))
        assert box.lam == pytest.approx(1 - box.area / 49)
        lams.append(box.lam)
    # Beta(1, 1) before clipping: boxes of every size occur
    assert min(lams) < 0.5 < max(lams)


def test_box_rule_on_small_grids():
    """The original box rule (sides int(grid * sqrt(1 - lam)), then +-
    side // 2 around the centre) never draws a box on a 2x2 grid (the
    token-label demo's 64 px students: MixToken is inert there) and does
    on 3x3."""
    torch.manual_seed(0)
    mix = MixToken(alpha=1., token_stride=8)
    assert all(mix.sample_box(2, 2).area == 0 for _ in range(200))
    assert any(mix.sample_box(3, 3).area > 0 for _ in range(200))


def test_mixing_after_the_stem_covers_whole_final_tokens():
    x = torch.randn(4, 3, 56, 56)
    box = TokenBox(x1=2, y1=1, x2=5, y2=3, grid_h=7, grid_w=7)
    mixed = swap_in_box(x, box, stride=8)
    inside = torch.zeros(56, 56, dtype=torch.bool)
    inside[8:24, 16:40] = True  # rows 1..3, columns 2..5 of 8-px tokens
    assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
    assert torch.equal(swap_in_box(mixed, box, 8), x)  # its own inverse


class LocalBackbone(nn.Module):
    """A stem of stride 4 and a stride-8 pooling: each final token sees only
    its own 32x32 pixels, so MixToken's swap-back must give each image's
    tokens their unmixed values."""

    def __init__(self):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Conv2d(3, 8, 4, stride=4)])
        self.pool = nn.AvgPool2d(8)

    def forward(self, x):
        return (self.pool(self.downsample_layers[0](x)), )


def test_token_outputs_are_swapped_back(monkeypatch):
    from mmpretrain.registry import MODELS
    MODELS.register_module('TLTestLocalBackbone', module=LocalBackbone,
                           force=True)
    model = TokenLabelClassifier(
        backbone=dict(type='TLTestLocalBackbone'),
        head=dict(type='TokenLabelClsHead', num_classes=5, in_channels=8))
    x = torch.randn(4, 3, 224, 224)
    samples = []
    for i in range(4):
        s = DataSample().set_gt_label(i)
        s.set_field(torch.full((5, 7, 7), .2), 'gt_token_label')
        samples.append(s)
    seen = {}

    def capture(cls_score, token_score, cls_target, token_target):
        seen.update(cls=cls_score, tokens=token_score, target=cls_target)
        return dict(loss=cls_score.sum())

    monkeypatch.setattr(model.head.loss_module, 'forward', capture)
    box = TokenBox(x1=1, y1=2, x2=6, y2=5, grid_h=7, grid_w=7)
    monkeypatch.setattr(MixToken, 'sample_box', lambda self, h, w: box)
    model.loss(x, samples)
    clean_cls, clean_tokens = model.head.scores(model.backbone(x))
    assert torch.allclose(seen['tokens'],
                          clean_tokens.reshape(4, 49, 5), atol=1e-6)
    # the class output saw the mixed image: not the clean one
    assert not torch.allclose(seen['cls'], clean_cls)
    # the image target is mixed by area: lam = 1 - 15 / 49
    lam = 1 - 15 / 49
    onehot = torch.eye(5)[:4]
    assert torch.allclose(seen['target'],
                          lam * onehot + (1 - lam) * onehot.flip(0))


def test_mix_token_on_biformer_stem():
    """The hook mixes BiFormer's stem output (stride 4) in 8-px blocks."""
    backbone = BiFormer(arch=MINI, n_win=7)
    mix = MixToken(token_stride=8)
    stem_out = {}
    handle = backbone.downsample_layers[0].register_forward_hook(
        lambda m, i, o: stem_out.setdefault('clean', o))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        backbone(x)
        handle.remove()
        box = TokenBox(0, 0, 3, 4, 7, 7)
        mix.sample_box = lambda h, w: box
        with mix.after(backbone.downsample_layers[0]) as boxes:
            seen = []
            h2 = backbone.stages[0][0].register_forward_pre_hook(
                lambda m, i: seen.append(i[0]))
            backbone(x)
            h2.remove()
    assert boxes == [box]
    clean = stem_out['clean']
    assert torch.equal(seen[0][:, :, :32, :24], clean.flip(0)[:, :, :32,
                                                              :24])
    assert torch.equal(seen[0][:, :, 32:], clean[:, :, 32:])


def test_loss_against_hand_computation():
    cls_score = torch.tensor([[2., 0., -1.]])
    token_score = torch.tensor([[[1., 1., 0.], [0., 3., 0.]]])
    cls_target = torch.tensor([[1., 0., 0.]])
    token_target = torch.tensor([[[.5, .5, 0.], [0., 0., 1.]]])
    s, k = 0.1, 3
    on, off = 1 - s + s / k, s / k

    def log_softmax(v):
        m = math.log(sum(math.exp(a) for a in v))
        return [a - m for a in v]

    def ce(score, target):
        return -sum((t * on + off) * ls
                    for t, ls in zip(target, log_softmax(score)))

    want_cls = ce([2., 0., -1.], [1., 0., 0.])
    want_tok = (ce([1., 1., 0.], [.5, .5, 0.]) +
                ce([0., 3., 0.], [0., 0., 1.])) / 2
    out = TokenLabelLoss(token_weight=0.5, label_smooth_val=s)(
        cls_score, token_score, cls_target, token_target)
    assert out['loss_cls'].item() == pytest.approx(want_cls, rel=1e-6)
    assert out['loss_token'].item() == pytest.approx(0.5 * want_tok,
                                                     rel=1e-6)
    beta = TokenLabelLoss(token_weight=2., label_smooth_val=s)(
        cls_score, token_score, cls_target, token_target)
    assert beta['loss_token'].item() == pytest.approx(2 * want_tok, rel=1e-6)
    with pytest.raises(ValueError, match='shape'):
        TokenLabelLoss()(cls_score, token_score, cls_target,
                         token_target[:, :1])


def test_test_time_score_is_cls_plus_half_max_token():
    head = TokenLabelClsHead(num_classes=4, in_channels=6)
    x = torch.randn(2, 6, 3, 3)
    cls_score, token_score = head.scores((x, ))
    assert torch.allclose(cls_score, head.fc(x.mean((2, 3))))
    assert token_score.shape == (2, 3, 3, 4)
    want = cls_score + 0.5 * token_score.reshape(2, 9, 4).max(1).values
    assert torch.allclose(head((x, )), want)
    pred = head.predict((x, ))
    assert torch.equal(torch.stack([p.pred_label for p in pred]).flatten(),
                       want.argmax(1))


def test_head_errors_name_the_fix():
    head = TokenLabelClsHead(num_classes=4, in_channels=6)
    s = DataSample().set_gt_label(1)
    with pytest.raises(KeyError, match='ResampleTokenLabel'):
        head.loss((torch.randn(1, 6, 3, 3), ), [s])
    s.set_field(torch.rand(4, 7, 7), 'gt_token_label')
    with pytest.raises(ValueError, match='output_size'):
        head.loss((torch.randn(1, 6, 3, 3), ), [s])


@pytest.mark.parametrize('arch, params', [('small', 26_049_232),
                                          ('base', 57_573_968)])
def test_parameter_counts(arch, params):
    """BiFormer-S* 26.0 M and B* 57.6 M with the token head."""
    dims = dict(small=512, base=768)[arch]
    model = TokenLabelClassifier(
        backbone=dict(type='BiFormer', arch=arch),
        head=dict(type='TokenLabelClsHead', num_classes=1000,
                  in_channels=dims))
    n = sum(p.numel() for p in model.parameters())
    assert n == params
    assert round(n / 1e6, 1) == dict(small=26.0, base=57.6)[arch]


def _mini_classifier():
    return TokenLabelClassifier(
        backbone=dict(type='BiFormer', arch=MINI, n_win=7),
        head=dict(type='TokenLabelClsHead', num_classes=10,
                  in_channels=256),
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=10))


def test_tl_checkpoint_loads_into_a_dense_backbone(tmp_path):
    """init_cfg Pretrained: every backbone key found, the class and token
    heads dropped, only the new per-output LayerNorms reported."""
    model = _mini_classifier()
    path = str(tmp_path / 'tl.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    dense = BiFormer(arch=MINI, n_win=7, out_indices=(0, 1, 2, 3),
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    dense.init_weights()
    report = dense.checkpoint_report
    assert report['missing'] == []
    assert report['unexpected'] == []
    assert report.get('shape_mismatch', []) == []
    assert sorted(report['new_norms']) and all(
        k.startswith(('norm0', 'norm1', 'norm2', 'norm3'))
        for k in report['new_norms'])
    for key, value in dense.state_dict().items():
        if not key.startswith('norm'):
            assert torch.equal(value, model.backbone.state_dict()[key]), key


def test_train_step_on_packed_samples():
    """One optimiser step of the classifier through its data preprocessor
    (soft crop label as gt_score, token labels as gt_token_label)."""
    from mmengine.optim import OptimWrapper
    torch.manual_seed(0)
    model = _mini_classifier()
    data = dict(inputs=[torch.randint(0, 255, (3, 224, 224),
                                      dtype=torch.uint8) for _ in range(2)],
                data_samples=[])
    for i in range(2):
        s = DataSample().set_gt_label(i)
        s.set_gt_score(torch.softmax(torch.randn(10), 0))
        s.set_field(torch.softmax(torch.randn(10, 7, 7), 0),
                    'gt_token_label')
        data['data_samples'].append(s)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    losses = model.train_step(data, wrapper)
    assert set(losses) == {'loss', 'loss_cls', 'loss_token'}
    assert torch.isfinite(losses['loss'])


def test_make_token_labels_writes_the_released_format(tmp_path):
    """The teacher's top-5 at each location of its last map, float16
    [2, 5, H, W], at <out>/<class folder>/<stem>.pt; readable by the
    loader; the per-location logits are the classifier's fc applied at
    that location."""
    import numpy as np
    from mmpretrain.models import ImageClassifier
    from PIL import Image

    from mmbiformer.apis.token_labels import (
                                              dense_class_logits,
                                              write_token_labels,
    )
    from mmbiformer.datasets import load_token_label
    teacher = ImageClassifier(
        backbone=dict(type='BiFormer', arch=MINI, n_win=4),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=256),
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=10,
                               mean=[0, 0, 0], std=[255, 255, 255]))
    rng = np.random.default_rng(0)
    for wnid in ('n1', 'n2'):
        d = tmp_path / 'train' / wnid
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(
            d / f'{wnid}_0.JPEG')
    n = write_token_labels(teacher, str(tmp_path / 'train'),
                           str(tmp_path / 'labels'), size=128, topk=5,
                           progress=False)
    assert n == 2
    raw = torch.load(str(tmp_path / 'labels' / 'n1' / 'n1_0.pt'))
    assert raw.dtype == torch.float16 and raw.shape == (2, 5, 4, 4)
    label = load_token_label(str(tmp_path / 'labels' / 'n1' / 'n1_0.pt'),
                             num_classes=10, topk=5)
    assert torch.all(label[0, :-1] >= label[0, 1:])  # sorted logits
    # the pooled score is the mean of the per-location scores
    x = torch.rand(1, 3, 128, 128)
    teacher.eval()
    with torch.no_grad():
        dense = dense_class_logits(teacher, x)
        pooled = teacher(x)
    assert torch.allclose(dense.mean((2, 3)), pooled, atol=1e-5)
    assert osp.isfile(str(tmp_path / 'labels' / 'n2' / 'n2_0.pt'))
