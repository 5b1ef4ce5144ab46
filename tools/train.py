"""Train a model of any of the three tasks from an OpenMMLab 2.x config.

The toolbox (mmpretrain, mmdet or mmseg) is chosen by the config's
``default_scope``. Examples::

    python tools/train.py configs/detection/maskrcnn_biformer_s_coco.py
    python tools/train.py CONFIG --resume            # latest in work dir
    python tools/train.py CONFIG --resume PATH.pth   # that checkpoint
    bash tools/dist_train.sh CONFIG 8                # 8 GPUs (CPU: gloo)

On a machine without CUDA, mixed-precision recipes train in fp32, SyncBN
becomes BN and distributed runs use gloo (each change is reported).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmbiformer.apis import launch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a model')
    p.add_argument('config', help='config file')
    launch.common_parser_args(p)
    p.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume training: from the given checkpoint, or without a '
        'value from the latest checkpoint in the work dir')
    p.add_argument('--amp', action='store_true',
                   help='mixed precision training (needs CUDA)')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help='scale the learning rate linearly with the total '
                   'batch size (auto_scale_lr.base_batch_size)')
    args = p.parse_args(argv)
    launch.export_local_rank(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = launch.load_config(args.config, args.cfg_options)
    launch.setup_work_dir(cfg, args.work_dir, args.config)
    launch.setup_amp(cfg, args.amp)
    launch.setup_resume(cfg, args.resume)
    launch.add_rng_state_hook(cfg)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or \
                'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr: the config has no '
                             'auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    launch.adapt_to_host(cfg, args.launcher)
    runner = launch.build_runner(cfg)
    runner.train()
    launch.finish_distributed()


if __name__ == '__main__':
    main()
