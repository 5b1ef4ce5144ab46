"""Token labeling on the built-in data, end to end, with the real tools.

1. writes the built-in classification data (``make_demo_data.py --tasks
   cls``) if it is not there;
2. trains a teacher (``tools/train.py``);
3. writes its label maps for every training image
   (``tools/dataset_converters/make_token_labels.py``, the released files'
   format) and prints a one-line check of them (entropy of the token
   targets, top-1 agreement of the maps with the image labels);
4. trains two students on the same schedule: token labeling off (the
   plain classifier) and on (``TokenLabelClassifier``: token labels,
   MixToken, token head);
5. each run ends with a validation on the 300 validation images (the
   recipe's ``Accuracy`` metric, in ``tools/train.py``); the teacher's and
   the two students' top-1 are printed next to each other with chance, and
   the wall time of every phase.

The configs are the real ones (``biformer_t_in1k.py`` and
``biformer_s_tl_in1k.py``) with one short CPU schedule, applied alike to
both students and kept in :data:`SCHEDULE`: the demo BiFormer (widths
32-64-128-256, depths 1-1-2-1), the built-in data's 6 classes (teacher,
label maps and students), 64 px crops of 50-100 % of the image (a 2x2 final
token grid), no RandAugment, random erasing, Mixup/CutMix, repeated
augmentation or EMA (they need long schedules), AdamW with a linear
warm-up and a cosine decay. The teacher is the same model trained three
times as long; it labels the whole images at ``label_size`` px. The merged
configs are written to the work dir.

Usage::

    python tools/token_label_demo.py [--root data/demo]
        [--work-dir work_dirs/token_label_demo]
"""
import argparse
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

#: the one short schedule of the proof (the students' alike)
SCHEDULE = dict(
    arch=dict(
        embed_dims=[32, 64, 128, 256],
        depths=[1, 1, 2, 1],
        head_dim=32,
        mlp_ratios=[3, 3, 3, 3],
        topks=[1, 4, 16, -2]),
    n_win=4,
    batch_size=32,
    lr=2e-3,
    warmup_iters=30,
    crop_ratio_range=(0.5, 1.0),
    workers=1,
    seed=0,
    student=dict(img_size=64, epochs=8),
    # the same model, 3x the students' schedule (92 % top-1 against their
    # 82-84 %); at 128 px it learned no more than at 64 px in 8 epochs
    # (83 %): the built-in images are 64 px
    teacher=dict(img_size=64, epochs=24),
    label_size=64,  # the teacher's training size: a 2x2 map
)


def class_folders(data_root: str) -> list:
    """The class folders of the training images, in label order."""
    return sorted(os.listdir(osp.join(data_root, 'train')))


def _schedule(cfg, img_size: int, epochs: int, data_root: str,
              classes: tuple, n_train: int):
    """The real config ``cfg`` shrunk to the demo's run."""
    s = SCHEDULE
    num_classes = len(classes)
    cfg.model.backbone.arch = s['arch']
    cfg.model.backbone.n_win = s['n_win']
    cfg.model.backbone.drop_path_rate = 0.
    cfg.model.head.num_classes = num_classes
    cfg.model.head.in_channels = s['arch']['embed_dims'][-1]
    cfg.model.train_cfg = None  # no Mixup / CutMix (MixToken stays)
    cfg.data_preprocessor.num_classes = num_classes
    meta = dict(classes=classes)
    for loader, split in ((cfg.train_dataloader, 'train'),
                          (cfg.val_dataloader, 'val')):
        loader.dataset.data_root = data_root
        loader.dataset.split = split
        loader.dataset.metainfo = meta
        loader.batch_size = s['batch_size']
        loader.num_workers = s['workers']
        loader.persistent_workers = s['workers'] > 0
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=True)
    # no RandAugment / random erasing in the short run
    cfg.train_dataloader.dataset.pipeline = [
        t for t in cfg.train_dataloader.dataset.pipeline
        if t['type'] not in ('RandAugment', 'RandomErasing')
    ]
    for t in cfg.train_dataloader.dataset.pipeline:
        if 'RandomResizedCrop' in t['type']:
            t['scale'] = img_size
            t['crop_ratio_range'] = s['crop_ratio_range']
        if t['type'] in ('LoadTokenLabel', 'ResampleTokenLabel'):
            t['num_classes'] = num_classes
        if t['type'] == 'ResampleTokenLabel':
            t['output_size'] = img_size // 32
    for t in cfg.val_dataloader.dataset.pipeline:
        if t['type'] == 'ResizeEdge':
            t['scale'] = img_size  # the whole 64 px image, resized
        if t['type'] == 'CenterCrop':
            t['crop_size'] = img_size
    cfg.val_evaluator = dict(type='Accuracy', topk=(1, ))
    cfg.test_dataloader = cfg.val_dataloader
    cfg.test_evaluator = cfg.val_evaluator
    cfg.optim_wrapper.optimizer.lr = s['lr']
    total = epochs * math.ceil(n_train / s['batch_size'])
    warmup = s['warmup_iters']
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup,
             end=total, T_max=total - warmup, eta_min=s['lr'] / 100)
    ]
    # validate once, after the last epoch
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs,
                         val_interval=epochs)
    cfg.custom_hooks = []  # no EMA over a few hundred steps
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=epochs, max_keep_ckpts=1)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=25)
    cfg.randomness = dict(seed=s['seed'])
    # the base configs' top-level shorthands, as this run uses them
    if 'num_classes' in cfg:
        cfg.num_classes = num_classes
    if 'train_pipeline' in cfg:
        cfg.train_pipeline = cfg.train_dataloader.dataset.pipeline
    if 'test_pipeline' in cfg:
        cfg.test_pipeline = cfg.val_dataloader.dataset.pipeline
    return cfg


def write_configs(work_dir: str, data_root: str) -> dict:
    """The teacher's and the two students' merged configs; name -> path."""
    from mmengine.config import Config
    s = SCHEDULE
    classes = tuple(f.split('_', 1)[-1] for f in class_folders(data_root))
    with open(osp.join(data_root, 'meta', 'train.txt')) as f:
        n_train = sum(1 for line in f if line.strip())
    os.makedirs(work_dir, exist_ok=True)
    plain = osp.join(REPO, 'configs/classification/biformer_t_in1k.py')
    tl = osp.join(REPO, 'configs/classification/biformer_s_tl_in1k.py')
    paths = {}
    for name, src, run in (('teacher', plain, s['teacher']),
                           ('student_plain', plain, s['student']),
                           ('student_tl', tl, s['student'])):
        cfg = _schedule(Config.fromfile(src), run['img_size'],
                        run['epochs'], data_root, classes, n_train)
        for t in cfg.train_dataloader.dataset.pipeline:
            if t['type'] == 'LoadTokenLabel':
                t['label_root'] = cfg.token_label_root = osp.join(
                    work_dir, 'labels')
        paths[name] = osp.join(work_dir, f'{name}.py')
        cfg.dump(paths[name])
    return paths


def run(cmd, log, env=None):
    print('$', ' '.join(cmd), flush=True)
    t0 = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, env=env,
                              stderr=subprocess.STDOUT, text=True)
    with open(log) as f:
        out = f.read()
    if proc.returncode:
        sys.exit(f'failed ({proc.returncode}); last lines of {log}:\n'
                 + out[-3000:])
    return out, time.time() - t0


def top1(out: str) -> float:
    found = re.findall(r'accuracy/top1: ([\d.]+)', out)
    if not found:
        raise RuntimeError('no accuracy/top1 in the output')
    return float(found[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--root', default='data/demo')
    p.add_argument('--work-dir', default='work_dirs/token_label_demo')
    args = p.parse_args(argv)
    py = sys.executable
    s = SCHEDULE
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    times, results = {}, {}
    _, times['data'] = run(
        [py, 'tools/dataset_converters/make_demo_data.py', '--root',
         args.root, '--tasks', 'cls'], osp.join(work, 'data.log'))
    data_root = osp.join(osp.abspath(args.root), 'imagenet')
    cfgs = write_configs(work, data_root)
    chance = 100. / len(class_folders(data_root))

    def train(name):
        out, times[name] = run(
            [py, 'tools/train.py', cfgs[name], '--work-dir',
             osp.join(work, name)], osp.join(work, f'{name}.log'))
        results[name] = top1(out)
        print(f'  {name}: top-1 {results[name]:.2f} % '
              f'({times[name]:.0f} s)', flush=True)
        epochs = s['teacher' if name == 'teacher' else 'student']['epochs']
        return osp.join(work, name, f'epoch_{epochs}.pth')

    ckpt = train('teacher')
    out, times['labels'] = run(
        [py, 'tools/dataset_converters/make_token_labels.py',
         cfgs['teacher'], ckpt, osp.join(data_root, 'train'),
         osp.join(work, 'labels'), '--size', str(s['label_size']),
         '--batch-size', '64'], osp.join(work, 'labels.log'))
    label_line = [line for line in out.splitlines()
                  if line.startswith('label maps:')]
    label_line = label_line[-1] if label_line else '(no summary)'
    print('  ' + label_line, flush=True)
    for name in ('student_plain', 'student_tl'):
        train(name)
    total = time.time() - t_start
    summary = dict(top1=results, chance=chance, label_maps=label_line,
                   seconds=times, total_seconds=total, schedule=s)
    with open(osp.join(work, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    st, te = s['student'], s['teacher']
    print(f'\nvalidation top-1 on {len(class_folders(data_root))} classes '
          f'(300 images):')
    print(f'  teacher ({te["epochs"]} epochs at {te["img_size"]} px): '
          f'{results["teacher"]:.2f} %')
    print(f'  students, {st["epochs"]} epochs at {st["img_size"]} px each: '
          f'token labeling off {results["student_plain"]:.2f} %, '
          f'on {results["student_tl"]:.2f} %')
    print(f'  chance: {chance:.2f} %')
    print(f'wall time {total / 60:.1f} min: ' + ', '.join(
        f'{k} {v:.0f} s' for k, v in times.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
