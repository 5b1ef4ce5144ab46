"""The built-in demo: the real workflow, in minutes, on the built-in data.

    python tools/demo.py                   # all three tasks (make demo)
    python tools/demo.py --tasks cls det   # some of them
    python tools/demo.py --print-options CONFIG   # data overrides only

Steps:

1. ``tools/dataset_converters/make_demo_data.py`` writes the data under
   ``data/demo`` unless it is already there;
2. classification: ``tools/train.py`` trains a small BiFormer (the demo
   architecture) with the real ImageNet config and the demo schedule
   (:data:`mmbiformer.apis.demo.DEMO_SCHEDULE`, the one place that says
   what the demo changes); the merged config is written next to the run
   (``work_dirs/demo/<task>/<config>_demo.py``);
3. detection (Mask R-CNN) and segmentation (Semantic FPN): their backbones
   start from that classifier's checkpoint through
   ``init_cfg=dict(type='Pretrained', ...)`` and are fine-tuned;
4. ``tools/test.py`` evaluates each last checkpoint on the validation
   split (images not seen in training); each metric is printed next to
   its chance level;
5. ``tools/infer.py`` draws one validation picture per task with the
   trained model; the paths are printed.
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

NAMES = dict(cls='classification', det='detection', seg='segmentation')
MODELS = dict(cls='BiFormer classifier', det='Mask R-CNN + BiFormer',
              seg='Semantic FPN + BiFormer')
PROGRESS = re.compile(r'(Epoch|Iter)\((train|val|test)\)|Saving checkpoint|'
                      r'Error|error:|Traceback|\[infer\]|tensors loaded')


def stream(cmd, log_file, prefix):
    """Run ``cmd``; keep its full output in ``log_file`` and show progress
    lines (mmengine's iteration logs)."""
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
            log.flush()
            tail = (tail + [line])[-40:]
            if PROGRESS.search(line) or line.startswith('[mmbiformer]'):
                text = re.sub(r'^\d+/\d+ [\d:]+ - mmengine - \w+ - ', '',
                              line.rstrip())
                text = re.sub(r'\s+(time|data_time|memory): [\d.]+', '',
                              text)
                print(f'  {prefix} {text[:150]}', flush=True)
        proc.wait()
    if proc.returncode:
        sys.stdout.write(''.join(tail))
        raise SystemExit(f'{prefix} failed ({cmd[1]}, exit '
                         f'{proc.returncode}); full log: {log_file}')


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def rel(path):
    return osp.relpath(path, REPO)


def run_task(task, args, init_ckpt=None):
    from mmbiformer.apis.demo import DEMO_SCHEDULE, demo_config

    spec = DEMO_SCHEDULE[task]
    work_dir = osp.join(args.work_dir, task)
    os.makedirs(work_dir, exist_ok=True)
    cfg = demo_config(task, args.root, init_ckpt, repo=REPO)
    config = osp.join(work_dir, osp.splitext(osp.basename(
        spec['config']))[0] + '_demo.py')
    cfg.dump(config)
    py = sys.executable
    length = (f'{spec["epochs"]} epochs' if 'epochs' in spec else
              f'{spec["iters"]} iterations')
    init = f', backbone from {rel(init_ckpt)}' if init_ckpt else \
        ', from scratch'
    arch = spec['arch']
    print(f'[{task}] training {MODELS[task]} ({spec["config"]} + the demo '
          f'schedule: BiFormer of widths {arch["embed_dims"]} and depths '
          f'{arch["depths"]}, {length}, batch {spec["batch_size"]}, '
          f'{spec["img_size"]} px{init})', flush=True)
    t0 = time.time()
    stream([py, 'tools/train.py', rel(config), '--work-dir', rel(work_dir)],
           osp.join(work_dir, 'demo_train.log'), f'[{task}]')
    ckpt = last_checkpoint(work_dir)
    t1 = time.time()
    print(f'[{task}] evaluating {rel(ckpt)} on the validation split',
          flush=True)
    metrics_file = osp.join(work_dir, 'metrics.json')
    stream([py, 'tools/test.py', rel(config), rel(ckpt), '--work-dir',
            rel(osp.join(work_dir, 'test')), '--metrics-out',
            rel(metrics_file)],
           osp.join(work_dir, 'demo_test.log'), f'[{task}]')
    with open(metrics_file) as f:
        metrics = json.load(f)
    return dict(metrics=metrics, ckpt=ckpt, config=config,
                train_s=t1 - t0, test_s=time.time() - t1)


def draw_one(task, result, args):
    """``tools/infer.py`` on one validation image; the picture's path."""
    from mmbiformer.apis.demo import validation_image

    image = validation_image(args.root, task)
    out_dir = osp.join(args.work_dir, task, 'infer')
    cmd = [sys.executable, 'tools/infer.py', rel(image), rel(result['config']),
           rel(result['ckpt']), '--out-dir', rel(out_dir), '--device', 'cpu']
    log = osp.join(args.work_dir, task, 'demo_infer.log')
    stream(cmd, log, f'[{task}]')
    with open(log) as f:
        written = re.findall(r'\[infer\] wrote (.+)', f.read())
    return written[-1].strip() if written else None


def metric_lines(task, result, chance):
    m = result['metrics']
    if task == 'cls':
        return [f'top-1 {m["accuracy/top1"]:5.1f} %   (chance '
                f'{chance["top1"]:.1f} %: {chance["n_classes"]} classes)']
    if task == 'det':
        return [f'box mAP  {m["coco/bbox_mAP"]:.3f}   (chance '
                f'{chance["bbox_mAP"]:.3f}: random boxes of the training '
                'sizes and classes)',
                f'mask mAP {m["coco/segm_mAP"]:.3f}   (box AP50 '
                f'{m["coco/bbox_mAP_50"]:.3f}, mask AP50 '
                f'{m["coco/segm_mAP_50"]:.3f})']
    return [f'mIoU {m["mIoU"]:5.1f} %   (baseline {chance["mIoU"]:.1f} %: '
            f'every pixel labelled "{chance["majority"]}", the most '
            'frequent class)',
            f'pixel accuracy {m["aAcc"]:5.1f} %   (baseline '
            f'{chance["aAcc"]:.1f} %)']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', default=list(NAMES),
                   choices=list(NAMES))
    p.add_argument('--root', default='data/demo', help='built-in data root')
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--init-from', help='backbone checkpoint for det/seg '
                   '(default: the classification run of this demo if it '
                   'ran, else the one of an earlier demo run if any)')
    p.add_argument('--no-draw', action='store_true',
                   help='skip drawing the validation pictures')
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
    from mmbiformer.apis.demo import chance_levels

    t0 = time.time()
    make_demo_data.make(args.root, tasks=args.tasks)
    phases = [('data', time.time() - t0)]
    results, init = {}, args.init_from
    if init is None and 'cls' not in args.tasks:
        prev = osp.join(args.work_dir, 'cls', 'last_checkpoint')
        if osp.exists(prev):
            init = last_checkpoint(osp.dirname(prev))
    for task in ('cls', 'det', 'seg'):
        if task not in args.tasks:
            continue
        results[task] = run_task(task, args, init)
        phases += [(f'{task} train', results[task]['train_s']),
                   (f'{task} test', results[task]['test_s'])]
        if task == 'cls' and args.init_from is None:
            init = results[task]['ckpt']
    pictures = {}
    if not args.no_draw:
        for task, result in results.items():
            t1 = time.time()
            pictures[task] = draw_one(task, result, args)
            phases.append((f'{task} draw', time.time() - t1))
    t1 = time.time()
    chance = chance_levels(args.root, list(results))
    phases.append(('chance levels', time.time() - t1))
    print('\n=== BiFormer demo on the built-in data: validation images, '
          f'not seen in training ({time.time() - t0:.0f} s in all) ===')
    for task, result in results.items():
        lines = metric_lines(task, result, chance[task])
        print(f'{NAMES[task]:<15}{lines[0]}')
        for line in lines[1:]:
            print(f'{"":<15}{line}')
        print(f'{"":<15}(train {result["train_s"]:.0f} s, test '
              f'{result["test_s"]:.0f} s; {MODELS[task]}; '
              f'config {rel(result["config"])})')
    if pictures:
        print('Predictions drawn on a validation image by tools/infer.py:')
        for task, path in pictures.items():
            print(f'  {NAMES[task]:<15}{path}')
    print(timing_line(phases, time.time() - t0))
    return 0


def timing_line(phases, total):
    """Wall time of each phase (process start-up included) and in all."""
    return 'Wall time: ' + ', '.join(
        f'{name} {secs:.0f} s' for name, secs in phases) + \
        f'; total {total:.0f} s ({total / 60:.1f} min)'


if __name__ == '__main__':
    sys.exit(main())
