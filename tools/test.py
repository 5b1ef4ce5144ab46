"""Evaluate a checkpoint of any of the three tasks.

The toolbox (mmpretrain, mmdet or mmseg) is chosen by the config's
``default_scope``. Examples::

    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --show-dir vis   # paint results
    bash tools/dist_test.sh CONFIG CHECKPOINT 8
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmbiformer.apis import launch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Test (evaluate) a model')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint file')
    launch.common_parser_args(p, test=True)
    p.add_argument('--out', help='also dump the predictions to this .pkl')
    p.add_argument('--show', action='store_true',
                   help='show the predictions in a window')
    p.add_argument('--show-dir', help='save images painted with the '
                   'predictions here (mmdet: under <work_dir>/<timestamp>/)')
    p.add_argument('--metrics-out', help='write the metrics as JSON here')
    args = p.parse_args(argv)
    launch.export_local_rank(args)
    return args


def _plain(value):
    """Metrics as JSON values (numpy scalars and arrays included)."""
    if hasattr(value, 'tolist'):
        return value.tolist()
    return value


def main(argv=None):
    args = parse_args(argv)
    cfg = launch.load_config(args.config, args.cfg_options)
    launch.setup_work_dir(cfg, args.work_dir, args.config)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    launch.enable_visualization(cfg, args.show_dir, args.show)
    if args.out:
        launch.add_dump_metric(cfg, args.out)
    launch.adapt_to_host(cfg, args.launcher)
    runner = launch.build_runner(cfg)
    metrics = runner.test()
    if args.metrics_out and runner.rank == 0:
        os.makedirs(osp.dirname(osp.abspath(args.metrics_out)),
                    exist_ok=True)
        with open(args.metrics_out, 'w') as f:
            json.dump({k: _plain(v) for k, v in metrics.items()}, f,
                      indent=1)
    launch.finish_distributed()
    return metrics


if __name__ == '__main__':
    main()
