"""What bi-level routing attention looks at, drawn over an image.

For a query point of the image and each routing stage of a BiFormer
backbone, :func:`routing_panels` draws the region grid, the query's region
(red) and the ``topk`` regions it routes to (yellow, numbered by routing
rank), and :func:`token_attention_map` gives the token-level attention of the
query token over the tokens of its routed regions (averaged over heads).
Drawing uses mmengine's :class:`~mmengine.visualization.Visualizer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbiformer.ops import BiLevelRoutingAttention

__all__ = [
    'StageRouting', 'collect_routing', 'token_attention_map',
    'routing_panels', 'render_routing'
]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class StageRouting:
    """Routing of one attention layer for one image.

    Attributes:
        stage: 0-based stage index.
        stride: pixels of the input image per feature-map token.
        feat_hw: (h, w) of the stage's feature map (before padding).
        info: the dict returned by ``BiLevelRoutingAttention(x,
            return_routing=True)`` (``topk_index`` (1, R, topk), ...).
        attn: the attention module.
        x: its input, (1, h, w, C).
    """
    stage: int
    stride: int
    feat_hw: Tuple[int, int]
    info: Dict
    attn: BiLevelRoutingAttention
    x: torch.Tensor


def collect_routing(backbone: nn.Module, image: torch.Tensor,
                    block: int = -1) -> List[StageRouting]:
    """Run ``backbone`` on ``image`` (1, 3, H, W) and record, for every
    stage with routing attention, the routing of its ``block``-th block."""
    stages = backbone.stages
    chosen: Dict[nn.Module, int] = {}
    for i, stage in enumerate(stages):
        attns = [b.attn for b in stage
                 if isinstance(getattr(b, 'attn', None),
                               BiLevelRoutingAttention)]
        if attns:
            chosen[attns[block]] = i
    inputs: Dict[nn.Module, torch.Tensor] = {}

    def hook(module, args):
        inputs[module] = args[0].detach()

    handles = [m.register_forward_pre_hook(hook) for m in chosen]
    try:
        with torch.no_grad():
            backbone(image)
    finally:
        for h in handles:
            h.remove()
    result = []
    for module, stage in chosen.items():
        x = inputs[module]
        with torch.no_grad():
            _, info = module(x, return_routing=True)
        result.append(
            StageRouting(stage=stage, stride=2**(stage + 2),
                         feat_hw=(x.shape[1], x.shape[2]), info=info,
                         attn=module, x=x))
    return result


def _query_region(r: StageRouting, point_xy: Tuple[float, float]
                  ) -> Tuple[int, int, int]:
    """(region index, token row, token col) of an image point."""
    h, w = r.feat_hw
    y = min(int(point_xy[1] // r.stride), h - 1)
    x = min(int(point_xy[0] // r.stride), w - 1)
    rh, rw = r.info['region_hw']
    return (y // rh) * r.info['n_win'] + x // rw, y, x


def token_attention_map(r: StageRouting,
                        point_xy: Tuple[float, float]) -> torch.Tensor:
    """Attention of the query token at ``point_xy`` (image pixels).

    Returns:
        Tensor (h, w): the head-averaged softmax weights over the stage's
        feature map; zero outside the routed regions.
    """
    attn = r.attn
    nw = r.info['n_win']
    hp, wp = r.info['padded_hw']
    rh, rw = r.info['region_hw']
    h, w = r.feat_hw
    pad = (0, 0, 0, wp - w, 0, hp - h)
    with torch.no_grad():
        if attn.pad_mode == 'after_qkv':  # zero padding after the projection
            q, k = (F.pad(t, pad) for t in attn.qkv(r.x)[:2])
        else:
            q, k, _ = attn.qkv(F.pad(r.x, pad))
    region, y, xx = _query_region(r, point_xy)
    routed = r.info['topk_index'][0, region]  # (topk,)
    m = attn.num_heads
    qv = q[0, y, xx].view(m, -1)  # (m, c)
    keys = k[0].view(nw, rh, nw, rw, m, -1).permute(0, 2, 1, 3, 4, 5)
    keys = keys.reshape(nw * nw, rh * rw, m, -1)[routed]  # (topk, T, m, c)
    valid = torch.ones(nw * nw, rh * rw, dtype=torch.bool)
    if attn.pad_mode == 'masked':
        grid = torch.zeros(hp, wp, dtype=torch.bool)
        grid[:h, :w] = True
        valid = grid.view(nw, rh, nw, rw).permute(0, 2, 1, 3).reshape(
            nw * nw, rh * rw)
    logits = torch.einsum('mc,ktmc->mkt', qv * attn.scale, keys)
    logits = logits.masked_fill(~valid[routed][None], float('-inf'))
    weights = logits.flatten(1).softmax(-1).mean(0).view(len(routed), -1)
    full = torch.zeros(nw * nw, rh * rw)
    full[routed] = weights
    full = full.view(nw, nw, rh, rw).permute(0, 2, 1, 3).reshape(hp, wp)
    return full[:h, :w]


def _region_boxes(r: StageRouting, regions: Sequence[int],
                  img_hw: Tuple[int, int], scale: float) -> np.ndarray:
    nw = r.info['n_win']
    rh, rw = r.info['region_hw']
    px = r.stride * scale  # display pixels per token
    boxes = []
    for reg in regions:
        j, i = divmod(int(reg), nw)
        x1, y1 = i * rw * px, j * rh * px
        x2 = min((i + 1) * rw * px, img_hw[1]) - 1
        y2 = min((j + 1) * rh * px, img_hw[0]) - 1
        boxes.append([x1, y1, max(x2, x1), max(y2, y1)])
    return np.asarray(boxes, dtype=np.float32)


def routing_panels(image_rgb: np.ndarray, routings: List[StageRouting],
                   point_xy: Tuple[float, float],
                   attn_stage: int = 1) -> List[np.ndarray]:
    """One RGB panel per routing stage, then the token attention of the
    query in routing stage ``attn_stage`` (0-based among routing stages).

    ``image_rgb`` may be an enlarged copy of the network's input: the scale
    is its width over the input width, and ``point_xy`` is in input pixels.
    """
    from mmengine.visualization import Visualizer
    img_hw = image_rgb.shape[:2]
    in_w = routings[0].feat_hw[1] * routings[0].stride if routings else 1
    scale = img_hw[1] / in_w
    shown_xy = (point_xy[0] * scale, point_xy[1] * scale)
    panels = []
    vis = Visualizer()
    for r in routings:
        vis.set_image(image_rgb)
        nw = r.info['n_win']
        rh, rw = r.info['region_hw']
        px = r.stride * scale
        xs = [min(i * rw * px, img_hw[1] - 1) for i in range(nw + 1)]
        ys = [min(j * rh * px, img_hw[0] - 1) for j in range(nw + 1)]
        for x in xs:
            vis.draw_lines(np.array([x, x]), np.array([0, img_hw[0] - 1]),
                           colors='white', line_widths=0.5)
        for y in ys:
            vis.draw_lines(np.array([0, img_hw[1] - 1]), np.array([y, y]),
                           colors='white', line_widths=0.5)
        region, _, _ = _query_region(r, point_xy)
        routed = r.info['topk_index'][0, region].tolist()
        boxes = _region_boxes(r, routed, img_hw, scale)
        vis.draw_bboxes(boxes, edge_colors='yellow', face_colors='yellow',
                        alpha=0.35, line_widths=1.5)
        if len(routed) <= 16:
            vis.draw_texts([str(n + 1) for n in range(len(routed))],
                           boxes[:, :2] + 2, colors='yellow', font_sizes=9)
        vis.draw_bboxes(_region_boxes(r, [region], img_hw, scale),
                        edge_colors='red', line_widths=3)
        vis.draw_points(np.array([shown_xy]), colors='red',
                        sizes=np.array([40]))
        vis.draw_texts(
            f'stage {r.stage + 1}: {nw}x{nw} regions, top-{len(routed)}',
            np.array([4, 4]), colors='white', font_sizes=10,
            bboxes=dict(facecolor='black', alpha=0.6, pad=2))
        panels.append(vis.get_image())
    if routings:
        last = routings[min(attn_stage, len(routings) - 1)]
        amap = token_attention_map(last, point_xy)
        amap = F.interpolate(amap[None, None], size=img_hw, mode='nearest')[0]
        heat = vis.draw_featmap(amap / amap.max().clamp_min(1e-12),
                                overlaid_image=image_rgb,
                                channel_reduction='squeeze_mean', alpha=0.6)
        vis.set_image(heat)
        vis.draw_points(np.array([shown_xy]), colors='red',
                        sizes=np.array([40]))
        vis.draw_texts(f'stage {last.stage + 1}: token attention',
                       np.array([4, 4]), colors='white', font_sizes=10,
                       bboxes=dict(facecolor='black', alpha=0.6, pad=2))
        panels.append(vis.get_image())
    return panels


def render_routing(backbone: nn.Module, image_rgb: np.ndarray,
                   points_xy: Sequence[Tuple[float, float]],
                   block: int = -1, attn_stage: int = 1,
                   display: Optional[np.ndarray] = None,
                   device: Optional[str] = None) -> np.ndarray:
    """Full figure: one row of panels per query point (RGB uint8).

    ``image_rgb`` is the network input (H, W, 3); ``display`` an optional
    enlarged copy to draw on (default: the input itself).
    """
    img = torch.from_numpy(image_rgb).float().permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = ((img - mean) / std)[None]
    if device:
        img = img.to(device)
    backbone.eval()
    routings = collect_routing(backbone, img, block=block)
    if not routings:
        raise ValueError('the backbone has no BiLevelRoutingAttention layer '
                         'to visualise')
    for r in routings:
        r.x = r.x.cpu()
        r.info['topk_index'] = r.info['topk_index'].cpu()
        r.attn = r.attn.cpu()
    rows = []
    for point in points_xy:
        panels = routing_panels(image_rgb if display is None else display,
                                routings, point, attn_stage)
        rows.append(np.concatenate(panels, axis=1))
    return np.concatenate(rows, axis=0)
