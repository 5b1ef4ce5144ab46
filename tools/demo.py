"""The built-in demo: train and evaluate one BiFormer-T-sized model per task
on the built-in data, with the real configs and the real tools.

    python tools/demo.py                   # all three tasks (make demo)
    python tools/demo.py --tasks seg       # one task
    python tools/demo.py --print-options CONFIG   # the overrides only

Steps:

1. ``tools/dataset_converters/make_demo_data.py`` writes the data under
   ``data/demo`` unless it is already there;
2. per task, ``tools/train.py`` trains the task's real config with
   ``--cfg-options`` that change only the data root, image size and
   schedule length (see :mod:`mmbiformer.apis.demo`), the batch size (a CPU
   needs a smaller one to take enough optimizer steps in minutes) and the
   model size (BiFormer-T);
3. ``tools/test.py`` evaluates the last checkpoint; the metrics are printed.

No downloaded weights: classification trains from scratch and its
checkpoint is then the "ImageNet" initialisation (``init_cfg``) of the
detection and segmentation backbones, as in the real pipeline.
"""
import argparse
import json
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time
import warnings

warnings.filterwarnings('ignore', message='.*pkg_resources')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, osp.join(REPO, 'tools', 'dataset_converters'))

import make_demo_data  # noqa: E402

# What each task trains: config, loop length (epochs or iterations), image
# size, batch size, and the metrics to report.
TASKS = dict(
    cls=dict(
        config='configs/classification/biformer_t_in1k.py',
        length=2, img_size=112, batch_size=16,
        metrics=[('accuracy/top1', 'top-1 (%)'),
                 ('accuracy/top5', 'top-5 (%)')]),
    det=dict(
        config='configs/detection/maskrcnn_biformer_s_coco.py',
        length=1, img_size=128, batch_size=2,
        # half of the training images: 50 iterations (a Mask R-CNN step is
        # the most expensive of the three on a CPU)
        extra=['train_dataloader.dataset.indices=100'], n_train=100,
        metrics=[('coco/bbox_mAP', 'box mAP'),
                 ('coco/segm_mAP', 'mask mAP'),
                 ('coco/bbox_mAP_50', 'box AP50')]),
    seg=dict(
        config='configs/segmentation/semfpn_biformer_s_ade20k.py',
        length=200, img_size=64, batch_size=4,
        metrics=[('mIoU', 'mIoU (%)'), ('aAcc', 'pixel acc (%)')]),
)
NAMES = dict(cls='classification', det='detection', seg='segmentation')
PROGRESS = re.compile(r'(Epoch|Iter)\((train|val|test)\)|Saving checkpoint|'
                      r'Error|error:|Traceback')


def task_options(task, root, init_ckpt=None):
    """The ``--cfg-options`` list of a task's demo run."""
    from mmbiformer.apis import builtin_data_options, load_config
    spec = TASKS[task]
    cfg = load_config(osp.join(REPO, spec['config']))
    opts = builtin_data_options(
        cfg, root=root, img_size=spec['img_size'], length=spec['length'],
        batch_size=spec['batch_size'], workers=2,
        n_train=spec.get('n_train'))
    opts += ['model.backbone.arch=tiny', 'randomness.seed=0',
             # evaluation by tools/test.py only (not twice)
             f'train_cfg.val_interval={spec["length"] + 1}']
    opts += spec.get('extra', [])
    if task != 'cls':
        opts.append('model.backbone.init_cfg.checkpoint=' + init_ckpt
                    if init_ckpt else 'model.backbone.init_cfg=None')
    return opts


def stream(cmd, log_file, prefix):
    """Run ``cmd``; keep its full output in ``log_file`` and show progress
    lines."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    with open(log_file, 'w') as log:
        log.write('$ ' + shlex.join(cmd) + '\n')
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        tail = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-40:]
            if PROGRESS.search(line) or line.startswith('[mmbiformer]'):
                text = re.sub(r'^\d+/\d+ [\d:]+ - mmengine - \w+ - ', '',
                              line.rstrip())
                print(f'  {prefix} {text[:160]}', flush=True)
        proc.wait()
    if proc.returncode:
        sys.stdout.write(''.join(tail))
        raise SystemExit(f'{prefix} failed ({cmd[1]}, exit '
                         f'{proc.returncode}); full log: {log_file}')


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def run_task(task, args, init_ckpt=None):
    spec = TASKS[task]
    work_dir = osp.join(args.work_dir, task)
    os.makedirs(work_dir, exist_ok=True)
    opts = task_options(task, args.root, init_ckpt)
    py = sys.executable
    t0 = time.time()
    print(f'[{task}] training {spec["config"]} (BiFormer-T) on '
          f'{osp.join(args.root, make_demo_data.TASKS[task][0])}',
          flush=True)
    stream([py, 'tools/train.py', spec['config'], '--work-dir', work_dir,
            '--cfg-options', *opts],
           osp.join(work_dir, 'demo_train.log'), f'[{task}]')
    ckpt = last_checkpoint(work_dir)
    t1 = time.time()
    print(f'[{task}] evaluating {osp.relpath(ckpt, REPO)}', flush=True)
    metrics_file = osp.join(work_dir, 'metrics.json')
    stream([py, 'tools/test.py', spec['config'], ckpt, '--work-dir',
            osp.join(work_dir, 'test'), '--metrics-out', metrics_file,
            '--cfg-options', *opts],
           osp.join(work_dir, 'demo_test.log'), f'[{task}]')
    with open(metrics_file) as f:
        metrics = json.load(f)
    return dict(metrics=metrics, ckpt=ckpt, train_s=t1 - t0,
                test_s=time.time() - t1)


def metric_line(task, result):
    parts = []
    for key, label in TASKS[task]['metrics']:
        if key in result['metrics']:
            v = result['metrics'][key]
            parts.append(f'{label} {v:.2f}' if '%' in label else
                         f'{label} {v:.3f}')
    return (f'{NAMES[task]:<14} {", ".join(parts)}   '
            f'(train {result["train_s"]:.0f}s, test {result["test_s"]:.0f}s)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', default=list(TASKS),
                   choices=list(TASKS))
    p.add_argument('--root', default='data/demo', help='built-in data root')
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--init-from', help='backbone checkpoint for det/seg '
                   '(default: the classification run of this demo if it '
                   'ran, else none)')
    p.add_argument('--print-options', metavar='CONFIG',
                   help='print the --cfg-options that run CONFIG on the '
                   'built-in data and exit')
    p.add_argument('--length', type=int,
                   help='with --print-options: epochs/iterations')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO)
    if args.print_options:
        from mmbiformer.apis import builtin_data_options, load_config
        cfg = load_config(args.print_options)
        print(' '.join(shlex.quote(o) for o in builtin_data_options(
            cfg, root=args.root, length=args.length)))
        return 0
    t0 = time.time()
    make_demo_data.make(args.root, tasks=args.tasks)
    results, init = {}, args.init_from
    for task in ('cls', 'det', 'seg'):
        if task not in args.tasks:
            continue
        results[task] = run_task(task, args, init)
        if task == 'cls' and init is None:
            init = results[task]['ckpt']
    print('\n=== BiFormer demo on the built-in data '
          f'({time.time() - t0:.0f}s in all) ===')
    for task, result in results.items():
        print(metric_line(task, result))
    if 'cls' in results:
        n_cls = len(make_demo_data.SHAPES)
        print(f'(chance: top-1 {100 / n_cls:.1f} % for the {n_cls} built-in '
              'classes. Minutes of CPU training from scratch show the '
              'pipeline end to end; the classifier and the detector need '
              'far longer schedules to learn, see configs/README.md)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
