"""Draw where bi-level routing attention looks, for a photo.

For each query point, one row of panels: for every routing stage the region
grid, the query's region (red) and its top-k routed regions (yellow,
numbered by rank); then the token attention of the query token in one stage.

Example::

    python tools/visualization/vis_routing.py --arch small \\
        --checkpoint biformer_small_best.pth --points 112,60 150,170 \\
        --out routing.png

Without ``--checkpoint`` the weights are random (the routing is then only a
picture of the mechanism, not of what a trained model learnt). The default
image is the photo that matplotlib ships (``grace_hopper.jpg``).
"""
import argparse
import os.path as osp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--image', default=None,
                   help="image file (default: matplotlib's grace_hopper.jpg)")
    p.add_argument('--checkpoint', default=None,
                   help='official ImageNet checkpoint or one of ours')
    p.add_argument('--arch', default='small', help='tiny, small or base')
    p.add_argument('--n-win', type=int, default=7)
    p.add_argument('--size', type=int, default=224,
                   help='the image is resized to size x size')
    p.add_argument('--points', nargs='+', default=None, metavar='X,Y',
                   help='query points in pixels of the resized image '
                   '(default: the centre)')
    p.add_argument('--block', type=int, default=-1,
                   help='which block of each stage (default: the last)')
    p.add_argument('--attn-stage', type=int, default=2,
                   help='stage (1-3) whose token attention is drawn')
    p.add_argument('--display-size', type=int, default=448,
                   help='side of each drawn panel in pixels')
    p.add_argument('--out', default='routing.png')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import mmcv
    import torch

    from mmbiformer.analysis.routing_vis import render_routing
    from mmbiformer.models import BiFormer

    image = args.image
    if image is None:
        from matplotlib import cbook
        image = cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)
    if not osp.isfile(image):
        raise SystemExit(f'--image {image}: no such file')
    rgb = mmcv.imresize(mmcv.imread(image, channel_order='rgb'),
                        (args.size, args.size), interpolation='bicubic')
    points = []
    for p in args.points or [f'{args.size // 2},{args.size // 2}']:
        try:
            x, y = (float(v) for v in p.split(','))
        except ValueError:
            raise SystemExit(f'--points {p!r}: write X,Y in pixels, e.g. '
                             '112,60') from None
        if not (0 <= x < args.size and 0 <= y < args.size):
            raise SystemExit(f'--points {p!r} lies outside the '
                             f'{args.size}x{args.size} image')
        points.append((x, y))
    init_cfg = None
    if args.checkpoint:
        init_cfg = dict(type='Pretrained', checkpoint=args.checkpoint)
    backbone = BiFormer(arch=args.arch, n_win=args.n_win, auto_pad=True,
                        init_cfg=init_cfg)
    backbone.init_weights()
    if not args.checkpoint:
        torch.manual_seed(0)
    display = mmcv.imresize(rgb, (args.display_size, args.display_size),
                            interpolation='bicubic')
    figure = render_routing(backbone, rgb, points, block=args.block,
                            attn_stage=args.attn_stage - 1, display=display)
    mmcv.imwrite(mmcv.rgb2bgr(figure), args.out)
    print(f'saved {args.out} ({figure.shape[1]}x{figure.shape[0]})')


if __name__ == '__main__':
    main()
