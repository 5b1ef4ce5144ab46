"""``pad_mode='after_qkv'``: BiFormer-STL-nchw's region and padding rules
as an option of the one layer and region graph."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbiformer.ops import BiLevelRoutingAttention
from mmbiformer.ops.routing import floor_region_grid, region_graph


@pytest.mark.parametrize('hw,expected', [
    ((56, 56), (8, 8, 7)),      # divisible: the n_win x n_win grid
    ((62, 82), (8, 11, 8)),     # 8 x 8 regions of 8 x 11
    ((31, 41), (4, 5, 9)),      # 8 x 9 regions of 4 x 5
    ((15, 20), (2, 2, 10)),     # 8 x 10 regions of 2 x 2
    ((3, 9), (1, 1, 9)),        # smaller than the grid: 1-token regions
])
def test_floor_region_grid(hw, expected):
    assert floor_region_grid(*hw, 7) == expected


def test_region_graph_keeps_padded_keys_but_never_routes_to_padding():
    h, w, g = 15, 20, 10
    rh, rw, _ = floor_region_grid(h, w, 7)
    valid = (torch.arange(g * rh) < h)[:, None] & (torch.arange(g * rw) < w)
    q = torch.randn(2, g * rh, g * rw, 8)
    k = torch.randn(2, g * rh, g * rw, 8)
    graph = region_graph(q, k, g, 16, 1.0, valid, mask_keys=False)
    assert graph.key_valid is None
    region_valid = valid.view(g, rh, g, rw).any(3).any(1).reshape(-1)
    assert region_valid.sum() == 8 * 10
    assert region_valid[graph.topk_index].all()
    masked = region_graph(q, k, g, 16, 1.0, valid)
    assert masked.key_valid is valid
    assert torch.equal(masked.topk_index, graph.topk_index)


def stl_nchw_attention(x: torch.Tensor, m: BiLevelRoutingAttention):
    """The official STL-nchw rules written out directly, channels first:
    avg pooling with ceil mode for the region means, zero padding of q, k,
    v after the projection, top-k routing on the (gh x gw) grid, softmax
    over all routed tokens including the padded ones, LePE of the unpadded
    v. ``x`` (N, H, W, C) -> (N, H, W, C)."""
    n, h, w, c = x.shape
    heads, d = m.num_heads, c // m.num_heads
    q, k, v = (t.permute(0, 3, 1, 2) for t in m.qkv(x))
    rh, rw = h // m.n_win, w // m.n_win
    pool = dict(kernel_size=(rh, rw), ceil_mode=True,
                count_include_pad=False)
    q_r = F.avg_pool2d(q, **pool).flatten(2).transpose(1, 2)
    k_r = F.avg_pool2d(k, **pool).flatten(2)
    idx = torch.topk(q_r @ k_r, m.topk, dim=-1).indices  # (n, R, topk)
    gh, gw = math.ceil(h / rh), math.ceil(w / rw)
    pad = (0, gw * rw - w, 0, gh * rh - h)

    def regions(t):  # (n, c, Hp, Wp) -> (n, heads, R, rh * rw, d)
        t = F.pad(t, pad).view(n, heads, d, gh, rh, gw, rw)
        return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(n, heads, gh * gw,
                                                      rh * rw, d)

    qr, kr, vr = regions(q), regions(k), regions(v)
    out = torch.empty_like(qr)
    for b in range(n):
        for r in range(gh * gw):
            keys = kr[b][:, idx[b, r]].flatten(1, 2)
            values = vr[b][:, idx[b, r]].flatten(1, 2)
            attn = torch.softmax(qr[b, :, r] * m.scale @ keys.transpose(1, 2),
                                 -1)
            out[b, :, r] = attn @ values
    out = out.view(n, heads, gh, gw, rh, rw, d).permute(0, 1, 6, 2, 4, 3, 5)
    out = out.reshape(n, c, gh * rh, gw * rw)[:, :, :h, :w]
    out = out + m.lepe(v)
    return m.wo(out.permute(0, 2, 3, 1))


@pytest.mark.parametrize('hw', [(14, 14), (15, 20), (31, 41), (20, 15)])
@pytest.mark.parametrize('backend', ['torch', 'official', 'reference'])
def test_after_qkv_matches_the_rules_written_out(hw, backend):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4,
                                auto_pad=True, pad_mode='after_qkv',
                                backend=backend)
    x = torch.randn(2, *hw, 64)
    with torch.no_grad():
        ours, info = m(x, return_routing=True)
        expected = stl_nchw_attention(x, m)
    assert (ours - expected).abs().max() < 1e-5
    rh, rw, g = floor_region_grid(*hw, 7)
    assert info['n_win'] == g and info['region_hw'] == (rh, rw)
    # the legacy padding computes something else at sizes n_win does not
    # divide
    if hw[0] % 7 or hw[1] % 7:
        m.pad_mode = 'legacy'
        with torch.no_grad():
            assert (m(x) - expected).abs().max() > 1e-3


def test_after_qkv_gradients_and_errors():
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=4,
                                auto_pad=True, pad_mode='after_qkv',
                                backend='torch')
    x = torch.randn(1, 15, 20, 64, requires_grad=True)
    m(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    m.auto_pad = False
    with pytest.raises(ValueError, match='auto_pad=True'):
        m(torch.randn(1, 15, 20, 64))
