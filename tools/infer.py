"""Predict on one image and draw the prediction.

    python tools/infer.py IMAGE CONFIG [CHECKPOINT] [--out-dir DIR]
                          [--device cpu] [--score-thr 0.3] [--topk 5]

The config's ``default_scope`` picks the toolbox's Inferencer: mmpretrain
(``ImageClassificationInferencer``: the top-5 classes, drawn and printed),
mmdet (``DetInferencer``: boxes and masks) or mmseg (``MMSegInferencer``:
the class map over the image). The picture goes to ``DIR/vis/`` and its path
is printed. CHECKPOINT may be this project's, an official BiFormer file
(converted in memory) or one of ``make demo``; a checkpoint of another
architecture or model is an error. Without CHECKPOINT the model has random
weights.
"""
import argparse
import os.path as osp
import sys
import warnings

warnings.filterwarnings('ignore', message='.*pkg_resources')
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(
        description='Predict on one image and draw the prediction')
    p.add_argument('image', help='image file')
    p.add_argument('config', help='config file (mmpretrain, mmdet or mmseg)')
    p.add_argument('checkpoint', nargs='?', help='checkpoint file')
    p.add_argument('--out-dir', default='outputs',
                   help='where the picture goes (under vis/; default '
                   'outputs)')
    p.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: cuda '
                   'if available, else cpu)')
    p.add_argument('--score-thr', type=float, default=0.3,
                   help='detection: draw boxes with at least this score')
    p.add_argument('--topk', type=int, default=5,
                   help='classification: number of classes shown')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, key=value pairs')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmbiformer.apis.infer import InferenceInputError, infer
    from mmbiformer.models.checkpoint import (
        ArchitectureMismatchError,
        CorruptCheckpointError,
    )
    try:
        result = infer(args.image, args.config, args.checkpoint,
                       out_dir=args.out_dir, device=args.device,
                       score_thr=args.score_thr, topk=args.topk,
                       cfg_options=args.cfg_options)
    except (FileNotFoundError, InferenceInputError, ArchitectureMismatchError,
            CorruptCheckpointError) as err:
        print(f'infer.py: error: {err}', file=sys.stderr)
        return 2
    print(f'[infer] prediction ({result["task"]}):')
    for line in result['lines']:
        print(f'  {line}')
    print(f'[infer] wrote {result["out_file"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
