"""benchmarks/mmcv_ext_torchvision.py (NMS and RoIAlign of mmcv's compiled
ops on torchvision's kernels) against mmcv's own compiled ops."""
import importlib.util
import os.path as osp

import pytest
import torch

pytest.importorskip('torchvision')
ops = pytest.importorskip('mmcv.ops')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _shim():
    spec = importlib.util.spec_from_file_location(
        'mmcv_ext_shim', osp.join(REPO, 'benchmarks',
                                  'mmcv_ext_torchvision.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 50
    return torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], 1)


def test_nms_matches_mmcv():
    shim = _shim()
    g = torch.Generator().manual_seed(0)
    boxes, scores = _boxes(200, g), torch.rand(200, generator=g)
    _, keep = ops.nms(boxes, scores, 0.5)
    assert torch.equal(shim.nms(boxes, scores, 0.5), keep)


def test_roi_align_matches_mmcv_forward_and_backward():
    shim = _shim()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 20, 24, generator=g)
    rois = torch.cat([torch.randint(0, 2, (7, 1), generator=g).float(),
                      _boxes(7, g) / 3], 1)
    grad = torch.randn(7, 3, 7, 7, generator=g)
    x = feats.clone().requires_grad_()
    want = ops.roi_align(x, rois, (7, 7), 0.5, 0, 'avg', True)
    want.backward(grad)
    out = torch.zeros(7, 3, 7, 7)
    empty = feats.new_zeros(0)
    shim.roi_align_forward(feats, rois, out, empty, empty, 7, 7, 0.5, 0, 1,
                           True)
    gin = torch.zeros_like(feats)
    shim.roi_align_backward(grad, rois, empty, empty, gin, 7, 7, 0.5, 0, 1,
                            True)
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(gin, x.grad)
    with pytest.raises(NotImplementedError, match='deform_conv'):
        shim.deform_conv_forward()
    assert not hasattr(shim, '__path__')
