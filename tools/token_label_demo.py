"""Token labeling on the built-in data, end to end, with the real tools.

1. writes the built-in classification data (``make_demo_data.py --tasks
   cls``) if it is not there;
2. trains a teacher (``tools/train.py``);
3. writes its label maps for every training image
   (``tools/dataset_converters/make_token_labels.py``, the released files'
   format);
4. trains two students on the same schedule: token labeling off (the
   plain classifier) and on (``TokenLabelClassifier``: token labels,
   MixToken, token head);
5. evaluates all three on the validation images (``tools/test.py``) and
   prints the students' top-1 next to each other.

The configs are the real ones (``biformer_t_in1k.py`` and
``biformer_s_tl_in1k.py``) with one short CPU schedule, applied alike to
both students and kept in :data:`SCHEDULE`: a mini BiFormer (the widths of
BiFormer-T halved, one block per stage but two in the third), 64 px crops
(a 2x2 final token grid), no RandAugment, random erasing, Mixup/CutMix or
EMA (they need long schedules), AdamW at the recipe's lr with one warm-up
epoch. The teacher is the same model trained longer; it labels the images
at ``label_size`` px (a 4x4 label map). The merged configs are written to
the work dir.

Usage::

    python tools/token_label_demo.py [--root data/demo]
        [--work-dir work_dirs/token_label_demo]
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

#: the one short schedule of the proof (teacher, and both students alike)
SCHEDULE = dict(
    arch=dict(
        embed_dims=[32, 64, 128, 256],
        depths=[1, 1, 2, 1],
        head_dim=32,
        mlp_ratios=[3, 3, 3, 3],
        topks=[1, 4, 16, -2]),
    n_win=4,
    img_size=64,
    label_size=128,
    batch_size=32,
    lr=1e-3,
    teacher_epochs=4,
    student_epochs=3,
    workers=1,
)


def _short_schedule(cfg, epochs: int, data_root: str):
    s = SCHEDULE
    cfg.model.backbone.arch = s['arch']
    cfg.model.backbone.n_win = s['n_win']
    cfg.model.backbone.drop_path_rate = 0.
    for loader, split in ((cfg.train_dataloader, 'train'),
                          (cfg.val_dataloader, 'val')):
        loader.dataset.data_root = data_root
        loader.dataset.split = split
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
            t['scale'] = s['img_size']
        if t['type'] == 'ResampleTokenLabel':
            t['output_size'] = s['img_size'] // 32
    for t in cfg.val_dataloader.dataset.pipeline:
        if t['type'] == 'ResizeEdge':
            t['scale'] = s['img_size']
        if t['type'] == 'CenterCrop':
            t['crop_size'] = s['img_size']
    cfg.test_dataloader = cfg.val_dataloader
    cfg.optim_wrapper.optimizer.lr = s['lr']
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=1,
             convert_to_iter_based=True),
        dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True,
             begin=1, end=epochs, T_max=epochs - 1)
    ]
    cfg.train_cfg = dict(by_epoch=True, max_epochs=epochs,
                         val_interval=epochs)
    cfg.custom_hooks = []  # no EMA over a few hundred steps
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=epochs, max_keep_ckpts=1)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10)
    cfg.randomness = dict(seed=0)
    return cfg


def write_configs(work_dir: str, data_root: str) -> dict:
    from mmengine.config import Config
    s = SCHEDULE
    paths = {}
    plain = osp.join(REPO, 'configs/classification/biformer_t_in1k.py')
    tl = osp.join(REPO, 'configs/classification/biformer_s_tl_in1k.py')
    for name, src, epochs in (('teacher', plain, s['teacher_epochs']),
                              ('student_plain', plain, s['student_epochs']),
                              ('student_tl', tl, s['student_epochs'])):
        cfg = _short_schedule(Config.fromfile(src), epochs, data_root)
        cfg.model.train_cfg = None  # no Mixup / CutMix
        cfg.model.head.in_channels = s['arch']['embed_dims'][-1]
        for t in cfg.train_dataloader.dataset.pipeline:
            if t['type'] == 'LoadTokenLabel':
                t['label_root'] = osp.join(work_dir, 'labels')
        paths[name] = osp.join(work_dir, f'{name}.py')
        cfg.dump(paths[name])
    return paths


def run(cmd, log):
    print('$', ' '.join(cmd), flush=True)
    t0 = time.time()
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f,
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
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    t_start = time.time()
    run([py, 'tools/dataset_converters/make_demo_data.py', '--root',
         args.root, '--tasks', 'cls'], osp.join(work, 'data.log'))
    data_root = osp.join(osp.abspath(args.root), 'imagenet')
    cfgs = write_configs(work, data_root)
    times, results = {}, {}

    def train(name):
        out, times[name] = run(
            [py, 'tools/train.py', cfgs[name], '--work-dir',
             osp.join(work, name)], osp.join(work, f'{name}.log'))
        epochs = SCHEDULE['teacher_epochs' if name == 'teacher' else
                          'student_epochs']
        return osp.join(work, name, f'epoch_{epochs}.pth')

    def test(name, ckpt):
        out, _ = run([py, 'tools/test.py', cfgs[name], ckpt, '--work-dir',
                      osp.join(work, name, 'test')],
                     osp.join(work, f'{name}_test.log'))
        results[name] = top1(out)

    ckpt = train('teacher')
    _, times['labels'] = run(
        [py, 'tools/dataset_converters/make_token_labels.py',
         cfgs['teacher'], ckpt, osp.join(data_root, 'train'),
         osp.join(work, 'labels'), '--size', str(SCHEDULE['label_size']),
         '--batch-size', '64'], osp.join(work, 'labels.log'))
    test('teacher', ckpt)
    for name in ('student_plain', 'student_tl'):
        test(name, train(name))
    total = time.time() - t_start
    summary = dict(top1=results, seconds=times, total_seconds=total,
                   schedule=SCHEDULE)
    with open(osp.join(work, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f'\nvalidation top-1 ({SCHEDULE["student_epochs"]} epochs each, '
          f'same schedule; chance 16.7 %):')
    print(f'  token labeling off: {results["student_plain"]:.2f} %')
    print(f'  token labeling on:  {results["student_tl"]:.2f} %')
    print(f'  (teacher, {SCHEDULE["teacher_epochs"]} epochs: '
          f'{results["teacher"]:.2f} %)')
    print(f'total {total / 60:.1f} min; ' + ', '.join(
        f'{k} {v:.0f} s' for k, v in times.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
