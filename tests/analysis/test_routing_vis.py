import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmbiformer.analysis.routing_vis import (
    collect_routing,
    token_attention_map,
)
from mmbiformer.models import BiFormer

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
from mini_arch import MINI  # noqa: E402

STL_NCHW_MINI = dict(BiFormer.arch_zoo['stl_nchw'],
                     embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                     mlp_ratios=[2, 2, 2, 2])


@pytest.mark.parametrize('arch', [MINI, STL_NCHW_MINI])
def test_token_attention_covers_exactly_the_routed_regions(arch):
    """Also for STL-nchw's rules (pad_mode='after_qkv'), whose region grid
    at these odd sizes is larger than n_win x n_win."""
    torch.manual_seed(0)
    net = BiFormer(arch=arch, n_win=4, auto_pad=True).eval()
    img = torch.randn(1, 3, 100, 132)
    routings = collect_routing(net, img)
    assert [r.stage for r in routings] == [0, 1, 2]
    for r in routings:
        topk = r.attn.topk
        assert r.info['topk_index'].shape[-1] == topk
        amap = token_attention_map(r, (70.0, 30.0))
        assert amap.shape == r.feat_hw
        # a softmax over the routed keys: sums to one (no padded key is
        # inside this crop, so nothing is lost)...
        hp, wp = r.info['padded_hw']
        if (hp, wp) == r.feat_hw:
            assert torch.allclose(amap.sum(), torch.tensor(1.0), atol=1e-5)
        # ... and is zero outside the routed regions
        nw = r.info['n_win']
        rh, rw = r.info['region_hw']
        region_of = torch.arange(nw * nw).view(nw, 1, nw, 1).expand(
            nw, rh, nw, rw).reshape(hp, wp)[:r.feat_hw[0], :r.feat_hw[1]]
        y, x = 30 // r.stride, 70 // r.stride
        query_region = (y // rh) * nw + x // rw
        routed = r.info['topk_index'][0, query_region]
        inside = torch.isin(region_of, routed)
        assert (amap[~inside] == 0).all()
        assert (amap[inside] > 0).any()


def test_vis_routing_tool_writes_png(tmp_path):
    out = tmp_path / 'routing.png'
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'visualization',
                                  'vis_routing.py'), '--arch', 'tiny',
         '--points', '112,60', '40,180', '--display-size', '224', '--out',
         str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import mmcv
    img = mmcv.imread(str(out))
    # two rows (query points) of 3 routing stages + 1 attention panel
    assert img.shape == (2 * 224, 4 * 224, 3)
    # the routed regions are painted yellow: strong red+green, weak blue
    rgb = img[..., ::-1].astype(int)
    yellowish = (rgb[..., 0] > 150) & (rgb[..., 1] > 150) & (rgb[..., 2] < 90)
    assert yellowish.mean() > 0.01
    assert not np.array_equal(img[:224], img[224:])
