"""How well FlexAttention's blocks fit BiFormer's regions (no attention is
run; CPU, seconds).

For BiFormer-S's routed stages at 224x224 (n_win 7) and at 800x1216
(n_win 16, regions padded to 13x19 tokens), and FlexAttention blocks of
128 (torch's default) and 64 tokens: the region-major layout
(:func:`mmbiformer.ops.flex_bra.flex_geometry`) and the token pairs in the
blocks FlexAttention computes against the pairs the routing needs
(:func:`mmbiformer.ops.flex_bra.block_stats`), under two routings:

* ``random``: every region routes to ``topk`` random regions (an
  untrained model);
* ``local``: to the ``topk`` regions nearest on the grid (itself first),
  the best case for blocks that hold several neighbouring regions.

    python benchmarks/flex_blocks.py
"""
import torch

from mmbiformer.ops import RegionGraph
from mmbiformer.ops.flex_bra import block_stats

# name, feature map (h, w), n_win, topk (BiFormer-S stages 1-3)
SHAPES = [
    ('cls-s1', (56, 56), 7, 1), ('cls-s2', (28, 28), 7, 4),
    ('cls-s3', (14, 14), 7, 16),
    ('det-s1', (208, 304), 16, 1), ('det-s2', (112, 160), 16, 4),
    ('det-s3', (64, 80), 16, 16),
]


def random_graph(n_win: int, topk: int, batch: int = 4) -> RegionGraph:
    g = torch.Generator().manual_seed(0)
    r = n_win * n_win
    idx = torch.rand(batch, r, r, generator=g).topk(topk, -1).indices
    return RegionGraph(idx, n_win)


def local_graph(n_win: int, topk: int) -> RegionGraph:
    ys, xs = torch.meshgrid(torch.arange(n_win), torch.arange(n_win),
                            indexing='ij')
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    dist = torch.cdist(pos, pos) + torch.arange(pos.shape[0]) * 1e-6
    idx = dist.topk(topk, -1, largest=False).indices
    return RegionGraph(idx.unsqueeze(0), n_win)


def main():
    print('| shape | T | slots T\' | block | regions / block | sequence '
          "L' / L | computed / routed, random | local | full blocks "
          '(random) |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for name, hw, nw, topk in SHAPES:
        for block in (128, 64):
            rnd = block_stats(random_graph(nw, topk), hw, block)
            loc = block_stats(local_graph(nw, topk), hw, block)
            seq = rnd['sequence']
            print(f"| {name} | {rnd['tokens']} | {rnd['slots']} | {block} "
                  f"| {rnd['regions_per_block']:g} | "
                  f'{seq[0] / seq[1]:.2f} | {rnd["inflation"]:.2f} | '
                  f'{loc["inflation"]:.2f} | '
                  f"{100 * rnd['full_blocks']:.0f} % |")


if __name__ == '__main__':
    main()
