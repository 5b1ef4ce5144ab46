"""Issue #7, mixed precision: float16 and bfloat16 autocast through every
attention backend and the whole backbone (CPU autocast here; CUDA autocast
casts the same ops).

Stated tolerances, relative to float32 (``||low - fp32|| / ||fp32||``), for
normalised-image-scale inputs (standard normal); measured values (mini
backbone, 112x144, CPU) in brackets:

* outputs of every stage: bfloat16 <= 3e-2 [7e-3], float16 <= 5e-3 [8e-4];
* the gradient of all parameters together, and of the input: bfloat16 <=
  5e-2 [1e-2], float16 <= 1e-2 [1.1e-3] (on the whole gradient: the
  routing's top-k is discrete, a region choice that flips in low precision
  moves single small tensors more);
* the attention op alone (every backend, outputs and q/k/v gradients):
  bfloat16 <= 2e-2 [6e-3], float16 <= 3e-3 [7.5e-4].

The detection and segmentation configs train with ``AmpOptimWrapper`` and a
static loss scale of 512 (checked in ``tests/configs``); the last test
trains a mini segmentor on the built-in demo images in float16 with that
scale and checks that no step overflows.
"""
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmbiformer.ops import RegionGraph, bra

from .conftest import make_mini

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CPU_BACKENDS = ['reference', 'official', 'torch']
DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}
OUT_TOL = {'bfloat16': 3e-2, 'float16': 5e-3}
GRAD_TOL = {'bfloat16': 5e-2, 'float16': 1e-2}
OP_TOL = {'bfloat16': 2e-2, 'float16': 3e-3}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _run(model, x, weights, dtype=None):
    """Outputs, flat parameter gradient and input gradient of a fixed
    random projection of the outputs."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        outs = model(x)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = torch.cat([
        p.grad.flatten() for p in model.parameters() if p.grad is not None
    ])
    return [o.detach() for o in outs], grads, x.grad


@pytest.fixture(scope='module')
def amp_setup(mini_state):
    torch.manual_seed(1)
    model = make_mini(mini_state, auto_pad=True, attn_backend='torch')
    x = torch.randn(1, 3, 112, 144)  # not a grid multiple: padding too
    with torch.no_grad():
        shapes = [o.shape for o in model(x)]
    weights = [torch.randn(s) / s.numel()**0.5 for s in shapes]
    return model, x, weights, _run(model, x, weights)


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('backend', CPU_BACKENDS + ['triton'])
def test_amp_backbone_every_backend(amp_setup, backend, dtype):
    if backend == 'triton':
        pytest.skip('the Triton backend runs on CUDA (on the CPU only under '
                    "Triton's interpreter, which does not model autocast)")
    model, x, weights, (ref_outs, ref_grads, ref_xgrad) = amp_setup
    model.attn_backend = backend
    try:
        outs, grads, xgrad = _run(model, x, weights, DTYPES[dtype])
    finally:
        model.attn_backend = 'torch'
    for o in outs:
        assert o.dtype == DTYPES[dtype]  # autocast did apply
        assert torch.isfinite(o).all()
    assert torch.isfinite(grads).all() and torch.isfinite(xgrad).all()
    assert grads.dtype == torch.float32  # parameters stay float32
    for o, r in zip(outs, ref_outs):
        assert _rel(o, r) <= OUT_TOL[dtype]
    assert _rel(grads, ref_grads) <= GRAD_TOL[dtype]
    assert _rel(xgrad, ref_xgrad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_amp_attention_op_in_low_precision(backend, dtype):
    """The op itself on float16/bfloat16 tensors (what autocast hands it
    after the float16 qkv projection), forward and backward."""
    torch.manual_seed(0)
    b, h, nw, d = 2, 2, 4, 32
    q, k, v = (torch.randn(b, 3 * nw, 3 * nw, h * d) for _ in range(3))
    r = nw * nw
    idx = torch.stack([torch.randperm(r)[:4] for _ in range(b * r)])
    graph = RegionGraph(idx.view(b, r, 4), nw)
    grad_out = torch.randn(b, 3 * nw, 3 * nw, h * d)

    def run(dt):
        qq, kk, vv = (z.to(dt).clone().requires_grad_(True)
                      for z in (q, k, v))
        out = bra(qq, kk, vv, graph, h, scale=d**-0.5, backend=backend)
        out.backward(grad_out.to(dt))
        return out, qq.grad, kk.grad, vv.grad

    ref = run(torch.float32)
    low = run(DTYPES[dtype])
    assert low[0].dtype == DTYPES[dtype]
    for a, r_ in zip(low, ref):
        assert torch.isfinite(a).all()
        assert _rel(a, r_) <= OP_TOL[dtype]


# ---------------------------------------------------- loss scale, fp16
def _demo_segmentation_batch(tmp_path, n=4, size=64):
    """``n`` images and labels from the built-in demo data generator."""
    spec = importlib.util.spec_from_file_location(
        'make_demo_data',
        osp.join(REPO, 'tools', 'dataset_converters', 'make_demo_data.py'))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    from PIL import Image
    root = str(tmp_path / 'ade')
    demo.make_seg(root, 'train', n, size, np.random.default_rng([0, 2, 0]))
    images, labels = [], []
    for i in range(1, n + 1):
        stem = f'ADE_train_{i:08d}'
        img = np.asarray(
            Image.open(osp.join(root, 'images', 'training', stem + '.jpg')))
        lab = np.asarray(
            Image.open(
                osp.join(root, 'annotations', 'training', stem + '.png')))
        images.append(torch.from_numpy(img.copy()).permute(2, 0, 1))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
    x = torch.stack(images).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    y = torch.stack(labels) - 1  # reduce_zero_label as the ADE configs
    y[y < 0] = 255
    return (x - mean) / std, y


class _MiniSegmentor(nn.Module):
    """The mini backbone (segmentation settings: n_win 8, auto_pad) and an
    FPN-like head: 1x1 conv per level, upsample to stride 4, sum, classify.
    """

    def __init__(self, state, num_classes=150):
        super().__init__()
        self.backbone = make_mini(state, n_win=8, auto_pad=True).train()
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, 64, 1) for c in (32, 64, 128, 256))
        self.cls = nn.Conv2d(64, num_classes, 1)

    def forward(self, x):
        feats = self.backbone(x)
        size = feats[0].shape[2:]
        fused = sum(
            F.interpolate(lat(f), size=size, mode='bilinear',
                          align_corners=False)
            for lat, f in zip(self.lateral, feats))
        return F.interpolate(self.cls(fused), size=x.shape[2:],
                             mode='bilinear', align_corners=False)


@pytest.mark.parametrize('loss_scale', [512., 'dynamic'])
def test_amp_loss_scale_does_not_overflow_on_builtin_data(
        tmp_path, mini_state, loss_scale):
    """float16 training steps as ``AmpOptimWrapper`` runs them: a static
    scale of 512 (the configs) must never overflow; the dynamic scale
    (starts at 2**16) may back off in the first steps only."""
    torch.manual_seed(0)
    x, y = _demo_segmentation_batch(tmp_path)
    model = _MiniSegmentor(mini_state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    if loss_scale == 'dynamic':
        scaler = torch.amp.GradScaler('cpu')
    else:
        scaler = torch.amp.GradScaler('cpu', init_scale=loss_scale)
    overflowed, losses, steps = [], [], 4
    for step in range(steps):
        batch = slice(2 * (step % 2), 2 * (step % 2) + 2)
        opt.zero_grad()
        with torch.autocast('cpu', dtype=torch.float16):
            logits = model(x[batch])
        loss = F.cross_entropy(logits.float(), y[batch], ignore_index=255)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        found_inf = sum(v.item() for v in
                        scaler._found_inf_per_device(opt).values())
        overflowed.append(found_inf > 0)
        losses.append(loss.item())
        scaler.step(opt)
        # a float scale is static in AmpOptimWrapper: reset every step
        scaler.update(None if loss_scale == 'dynamic' else loss_scale)
    assert all(np.isfinite(losses)), losses
    if loss_scale == 'dynamic':
        first_good = overflowed.index(False)
        assert not any(overflowed[first_good:]), overflowed
        assert first_good <= 2 and scaler.get_scale() >= 512
    else:
        assert not any(overflowed), overflowed
        assert scaler.get_scale() == 512
    assert losses[-1] < losses[0] * 1.5  # it trains, not diverges
