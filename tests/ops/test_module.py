"""BiLevelRoutingAttention: checkpoint contract and official semantics."""
import pytest
import torch
import torch.nn.functional as F

from mmbiformer.ops import BiLevelRoutingAttention

BACKENDS = ('reference', 'official', 'torch')


def official_forward(m, x):
    """Plain-torch transcription of the official BRA data flow.

    Written independently of the package code: channels-last regions, one
    routing over all channels, joint k|v gather of expanded regions, scale
    over the whole qk_dim, LePE on the (padded) v map.
    """
    n, h, w, c = x.shape
    nw, qk, heads = m.n_win, m.qk_dim, m.num_heads
    pad_b, pad_r = (-h) % nw, (-w) % nw
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    rh, rw, r = hp // nw, wp // nw, nw * nw
    t = rh * rw
    qkv = F.linear(x, m.qkv.qkv.weight, m.qkv.qkv.bias)

    def to_regions(z):
        ch = z.shape[-1]
        z = z.view(n, nw, rh, nw, rw, ch).permute(0, 1, 3, 2, 4, 5)
        return z.reshape(n, r, rh, rw, ch)

    q, kv = qkv.split([qk, qk + c], dim=-1)
    q, kv = to_regions(q), to_regions(kv)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
    v_img = kv[..., qk:].view(n, nw, nw, rh, rw, c).permute(0, 5, 1, 3, 2, 4)
    v_img = v_img.reshape(n, c, hp, wp)
    lepe = F.conv2d(v_img, m.lepe.weight, m.lepe.bias,
                    padding=m.side_dwconv // 2, groups=c)
    logits = (q_win * m.scale) @ k_win.transpose(-2, -1)
    idx = torch.topk(logits, k=m.topk, dim=-1).indices
    kv_pix = kv.reshape(n, 1, r, t, qk + c).expand(n, r, r, t, qk + c)
    sel = torch.gather(kv_pix, 2, idx.view(n, r, m.topk, 1, 1).expand(
        -1, -1, -1, t, qk + c))
    k_sel, v_sel = sel.split([qk, c], dim=-1)
    k_sel = k_sel.reshape(n * r, m.topk * t, heads, qk // heads)
    k_sel = k_sel.permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * r, m.topk * t, heads, c // heads)
    v_sel = v_sel.permute(0, 2, 1, 3)
    q_pix = q.reshape(n * r, t, heads, qk // heads).permute(0, 2, 1, 3)
    attn = torch.softmax((q_pix * m.scale) @ k_sel, dim=-1)
    out = (attn @ v_sel).permute(0, 2, 1, 3).reshape(n, nw, nw, rh, rw, c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, c)
    out = out + lepe.permute(0, 2, 3, 1)
    out = F.linear(out, m.wo.weight, m.wo.bias)
    return out[:, :h, :w].contiguous(), idx


def test_state_dict_names_and_shapes():
    m = BiLevelRoutingAttention(64, num_heads=2, n_win=7, qk_dim=32)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        'qkv.qkv.weight': (2 * 32 + 64, 64), 'qkv.qkv.bias': (128, ),
        'wo.weight': (64, 64), 'wo.bias': (64, ),
        'lepe.weight': (64, 1, 5, 5), 'lepe.bias': (64, )}


@pytest.mark.parametrize('backend', BACKENDS + ('auto', ))
@pytest.mark.parametrize('hw,n_win,topk,heads', [
    ((14, 14), 7, 4, 2), ((30, 25), 7, 5, 4), ((9, 13), 4, 16, 1),
    ((8, 8), 2, 1, 8)])
def test_matches_official_dataflow(backend, hw, n_win, topk, heads):
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(32, num_heads=heads, n_win=n_win, topk=topk,
                                auto_pad=True, backend=backend)
    x = torch.randn(2, *hw, 32)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y, info = m(x1, return_routing=True)
    y_ref, idx = official_forward(m, x2)
    assert y.shape == x.shape
    assert torch.equal(info['topk_index'], idx)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (gx1, ) = torch.autograd.grad(y, x1, g)
    (gx2, ) = torch.autograd.grad(y_ref, x2, g)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-4)


def test_routing_info_and_backend_switch():
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3,
                                auto_pad=True)
    x = torch.randn(1, 10, 11, 32)
    y, info = m(x, return_routing=True)
    assert info['topk_index'].shape == (1, 16, 3)
    assert info['topk_index'].dtype == torch.long
    assert info['routing_logits'].shape == (1, 16, 16)
    assert info['n_win'] == 4 and info['padded_hw'] == (12, 12)
    m.backend = 'official'
    y2 = m(x)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    m.backend = 'nope'
    with pytest.raises(ValueError, match='backend'):
        m(x)


def test_masked_equals_legacy_without_padding():
    torch.manual_seed(1)
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=4, topk=3,
                                pad_mode='masked')
    x = torch.randn(2, 8, 12, 32)
    y = m(x)
    m.pad_mode = 'legacy'
    torch.testing.assert_close(y, m(x), atol=0, rtol=0)


@pytest.mark.parametrize('backend', BACKENDS)
def test_masked_padding_ignores_padded_tokens(backend):
    """'masked': what padded tokens hold must not change the output."""
    torch.manual_seed(2)
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=3, topk=4,
                                auto_pad=True, pad_mode='masked',
                                side_dwconv=0, backend=backend)
    x = torch.randn(2, 7, 8, 32)

    def perturb_padding(module, inputs, out):
        noise = 10 * torch.randn_like(out)
        noise[:, :7, :8] = 0
        return out + noise

    y, info = m(x, return_routing=True)
    assert info['padded_hw'] == (9, 9)
    handle = m.qkv.qkv.register_forward_hook(perturb_padding)
    try:
        y_perturbed, info2 = m(x, return_routing=True)
    finally:
        handle.remove()
    torch.testing.assert_close(y_perturbed, y, atol=1e-5, rtol=1e-5)
    assert torch.equal(info2['topk_index'], info['topk_index'])
    # 'legacy' does depend on the padded tokens
    m.pad_mode = 'legacy'
    y_legacy = m(x)
    handle = m.qkv.qkv.register_forward_hook(perturb_padding)
    try:
        assert not torch.allclose(m(x), y_legacy, atol=1e-3)
    finally:
        handle.remove()


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match='num_heads'):
        BiLevelRoutingAttention(30, num_heads=4)
    with pytest.raises(ValueError, match='topk'):
        BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=5)
    with pytest.raises(ValueError, match='pad_mode'):
        BiLevelRoutingAttention(32, num_heads=2, pad_mode='zeros')
    m = BiLevelRoutingAttention(32, num_heads=2, n_win=7)
    with pytest.raises(ValueError, match='auto_pad=True'):
        m(torch.randn(1, 10, 14, 32))
    with pytest.raises(ValueError, match='smaller than the 7x7 region'):
        m(torch.randn(1, 5, 14, 32))
    with pytest.raises(ValueError, match='channels-last'):
        m(torch.randn(1, 32, 14, 14))
