"""``--cfg-options`` that run a real config on the built-in demo data.

The real configs keep the official data roots, image sizes and schedules;
:func:`builtin_data_options` computes the overrides that point one at the
data written by ``tools/dataset_converters/make_demo_data.py`` and shrink
it to a CPU-sized run. It overrides only

* data: dataset roots (and the COCO evaluators' annotation files), data
  loader workers;
* image size: the resize/crop sizes of the pipelines (and mmseg's
  ``data_preprocessor.size``);
* schedule length: the loop length, and everything tied to it, scaled by
  the same factor: the LR scheduler boundaries, the validation and
  checkpoint intervals and the EMA momentum (an EMA horizon of a fixed
  fraction of training);

and log intervals for progress. Batch sizes, optimizers, learning rates and
augmentations stay as the recipe has them.
"""
import copy
import math
import os
import os.path as osp
from typing import List, Optional

#: config default_scope -> demo task name
TASK_OF_SCOPE = dict(mmpretrain='cls', mmdet='det', mmseg='seg')

#: the official runs: training images and total batch (8 GPUs), used to
#: scale iteration-measured settings by demo iterations / official ones
OFFICIAL_TRAIN_IMAGES = dict(cls=1281167, det=117266, seg=20210)

#: sub-directory of each task's data under the demo root
DATA_DIRS = dict(cls='imagenet', det='coco',
                 seg=osp.join('ade', 'ADEChallengeData2016'))


def _fmt(value) -> str:
    """A value as ``--cfg-options`` parses it back (no spaces)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return '(' + ','.join(_fmt(v) for v in value) + \
            (',)' if len(value) == 1 else ')')
    if isinstance(value, list):
        return '[' + ','.join(_fmt(v) for v in value) + ']'
    return str(value)


def _index(pipeline, *types) -> int:
    for i, t in enumerate(pipeline):
        if t.get('type') in types:
            return i
    raise KeyError(f'no {"/".join(types)} transform in the pipeline')


def _batch(loader) -> int:
    return int(loader.get('batch_size', 1))


def _epoch_based(cfg) -> bool:
    tc = cfg.train_cfg
    return tc.get('by_epoch', False) or \
        tc.get('type') == 'EpochBasedTrainLoop'


def _official_length(cfg) -> int:
    tc = cfg.train_cfg
    return int(tc.max_epochs if _epoch_based(cfg) else tc.max_iters)


def _iters_per_epoch(n_images: int, batch: int, world: int) -> int:
    return max(1, math.ceil(n_images / (batch * world)))


def demo_train_images(root: str, task: str) -> int:
    """Number of training images of the generated demo data."""
    d = osp.join(root, DATA_DIRS[task])
    if task == 'cls':
        with open(osp.join(d, 'meta', 'train.txt')) as f:
            return sum(1 for line in f if line.strip())
    if task == 'det':
        import json
        with open(osp.join(d, 'annotations',
                           'instances_train2017.json')) as f:
            return len(json.load(f)['images'])
    return len(os.listdir(osp.join(d, 'images', 'training')))


def demo_classes(root: str, task: str) -> tuple:
    """The class names of the built-in data, in label order: its object
    classes (classification, detection) or its stuff and object classes
    (segmentation), as names of the dataset's own class list (the demo
    models predict these and no others)."""
    d = osp.join(root, DATA_DIRS[task])
    if task == 'cls':
        return tuple(f.split('_', 1)[-1]
                     for f in sorted(os.listdir(osp.join(d, 'train'))))
    if task == 'det':
        import json
        with open(osp.join(d, 'annotations',
                           'instances_train2017.json')) as f:
            data = json.load(f)
        used = {a['category_id'] for a in data['annotations']}
        return tuple(c['name'] for c in sorted(data['categories'],
                                               key=lambda c: c['id'])
                     if c['id'] in used)
    import numpy as np
    from mmseg.datasets import ADE20KDataset
    from PIL import Image
    ann_dir = osp.join(d, 'annotations', 'training')
    values = set()
    for name in sorted(os.listdir(ann_dir)):
        values |= set(np.unique(np.asarray(
            Image.open(osp.join(ann_dir, name)))).tolist())
    names = ADE20KDataset.METAINFO['classes']
    # label v (1..150) is class v - 1 (reduce_zero_label); 0 is ignored
    return tuple(names[v - 1] for v in sorted(values - {0}))


def builtin_data_options(cfg,
                         root: str = 'data/demo',
                         img_size: Optional[int] = None,
                         length: Optional[int] = None,
                         world_size: int = 1,
                         n_train: Optional[int] = None,
                         workers: Optional[int] = None,
                         log_interval: int = 10,
                         batch_size: Optional[int] = None) -> List[str]:
    """``key=value`` overrides that run ``cfg`` on the built-in data.

    Args:
        cfg: the loaded real config (mmpretrain, mmdet or mmseg scope).
        root: demo data root (``make_demo_data.py --root``).
        img_size: training crop / resize side; defaults per task (cls 112,
            det 128, seg 128).
        length: epochs (epoch-based loops) or iterations (iteration-based
            loops); defaults to 1 epoch / 20 iterations.
        world_size: processes the run will use (to count iterations).
        n_train: number of demo training images (read from the data when
            None and the data exists; only used for scaling).
        workers: data loader workers per process (None: the config's).
        log_interval: logger interval in iterations.
        batch_size: training images per process; None keeps the recipe's.
            (A smaller batch is the one deviation a CPU demo needs: it keeps
            the number of optimizer steps reasonable in a few minutes.)
    """
    task = TASK_OF_SCOPE[cfg.default_scope]
    data_root = osp.join(root, DATA_DIRS[task])
    opts = {}
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    for name in loaders:
        if cfg.get(name) is None:
            continue
        opts[f'{name}.dataset.data_root'] = data_root + '/'
        if workers is not None:
            opts[f'{name}.num_workers'] = workers
            opts[f'{name}.persistent_workers'] = workers > 0

    tr = cfg.train_dataloader.dataset.pipeline
    te = cfg.test_dataloader.dataset.pipeline
    va = cfg.val_dataloader.dataset.pipeline
    if task == 'cls':
        s = img_size or 112
        i = _index(tr, 'RandomResizedCrop')
        opts[f'train_dataloader.dataset.pipeline.{i}.scale'] = s
        for name, pl in (('val_dataloader', va), ('test_dataloader', te)):
            i = _index(pl, 'ResizeEdge')
            # keep the official crop ratio (224 of 256)
            opts[f'{name}.dataset.pipeline.{i}.scale'] = \
                int(round(s * 256 / 224))
            i = _index(pl, 'CenterCrop')
            opts[f'{name}.dataset.pipeline.{i}.crop_size'] = s
    elif task == 'det':
        s = img_size or 128
        i = _index(tr, 'Resize', 'RandomResize', 'RandomChoiceResize')
        opts[f'train_dataloader.dataset.pipeline.{i}.scale'] = (s, s)
        for name, pl in (('val_dataloader', va), ('test_dataloader', te)):
            i = _index(pl, 'Resize')
            opts[f'{name}.dataset.pipeline.{i}.scale'] = (s, s)
        for name in ('val_evaluator', 'test_evaluator'):
            ev = cfg.get(name)
            if isinstance(ev, dict) and 'ann_file' in ev:
                split = 'val2017'
                opts[f'{name}.ann_file'] = osp.join(
                    data_root, 'annotations', f'instances_{split}.json')
    else:  # seg
        s = img_size or 128
        i = _index(tr, 'RandomResize')
        opts[f'train_dataloader.dataset.pipeline.{i}.scale'] = (4 * s, s)
        i = _index(tr, 'RandomCrop')
        opts[f'train_dataloader.dataset.pipeline.{i}.crop_size'] = (s, s)
        for name, pl in (('val_dataloader', va), ('test_dataloader', te)):
            i = _index(pl, 'Resize')
            opts[f'{name}.dataset.pipeline.{i}.scale'] = (4 * s, s)
        if cfg.model.get('data_preprocessor', {}).get('size') is not None:
            opts['model.data_preprocessor.size'] = (s, s)

    if batch_size is not None:
        opts['train_dataloader.batch_size'] = batch_size
        cfg = copy.deepcopy(cfg)
        cfg.train_dataloader.batch_size = batch_size
    opts.update(_schedule_options(cfg, task, root, length, world_size,
                                  n_train))
    opts['default_hooks.logger.interval'] = log_interval
    return [f'{k}={_fmt(v)}' for k, v in opts.items()]


def _schedule_options(cfg, task, root, length, world_size, n_train):
    """Scale the schedule to ``length`` epochs/iterations."""
    opts = {}
    epoch_based = _epoch_based(cfg)
    old_len = _official_length(cfg)
    new_len = int(length or (1 if epoch_based else 20))
    f = new_len / old_len
    # total training iterations of the official run and of the demo run
    batch = _batch(cfg.train_dataloader)
    if epoch_based:
        if n_train is None:
            try:
                n_train = demo_train_images(root, task)
            except OSError:
                n_train = 300
        off_epoch = _iters_per_epoch(OFFICIAL_TRAIN_IMAGES[task], batch, 8)
        new_epoch = _iters_per_epoch(n_train, batch, world_size)
        f_iter = (new_len * new_epoch) / (old_len * off_epoch)
    else:
        f_iter, new_epoch = f, 1

    if epoch_based:
        opts['train_cfg.max_epochs'] = new_len
    else:
        opts['train_cfg.max_iters'] = new_len
    opts['train_cfg.val_interval'] = new_len
    ckpt = cfg.default_hooks.get('checkpoint')
    if ckpt is not None:
        opts['default_hooks.checkpoint.interval'] = new_len
        opts['default_hooks.checkpoint.max_keep_ckpts'] = 2

    scheds = cfg.get('param_scheduler') or []
    if isinstance(scheds, dict):
        scheds = [scheds]
    for k, sch in enumerate(scheds):
        opts.update(_scale_scheduler(f'param_scheduler.{k}', dict(sch),
                                     epoch_based, old_len, new_len, f,
                                     f_iter, new_epoch))

    # EMA: keep the averaging horizon the same fraction of training
    for k, hook in enumerate(cfg.get('custom_hooks') or []):
        if hook.get('type') == 'EMAHook' and 'momentum' in hook:
            # (mmengine needs momentum < 1; at most 0.5: a 2-iteration horizon)
            m = min(0.5, hook["momentum"] / max(f_iter, 1e-12))
            opts[f'custom_hooks.{k}.momentum'] = float(f'{m:.4g}')
    return opts


def _scale_scheduler(key, sch, epoch_based, old_len, new_len, f, f_iter,
                     iters_per_epoch):
    """Overrides of one LR/momentum scheduler for the new length.

    Boundaries counted in the loop's unit are scaled by ``f`` (a boundary at
    or past the official end moves to the new end); iteration boundaries of
    an epoch-based loop (e.g. mmdet's 500-iteration warm-up) by ``f_iter``.
    """
    opts = {}
    in_loop_unit = sch.get('by_epoch', True) == epoch_based
    fractional = epoch_based and in_loop_unit and \
        sch.get('convert_to_iter_based', False)
    g = f if in_loop_unit else f_iter

    def scale(v):
        """The same boundary always maps to the same value, so schedulers
        that meet (warm-up end = decay begin) still meet; a positive
        boundary stays positive: at least two iterations (mmengine's
        LinearLR needs two steps) or one epoch."""
        if in_loop_unit and v >= old_len:
            return new_len
        if v <= 0:
            return 0
        v = v * g
        if fractional:
            # mmengine converts with int(v * iters_per_epoch): land exactly
            # on a whole number of iterations
            n = max(2, int(round(v * iters_per_epoch)))
            return round((n + 1e-3) / iters_per_epoch, 4)
        return max(1 if (epoch_based and in_loop_unit) else 2,
                   int(round(v)))

    begin = sch.get('begin', 0)
    nb = scale(begin)
    if begin:
        opts[f'{key}.begin'] = nb
    ne = None
    if 'end' in sch:
        ne = scale(sch['end'])
        if ne <= nb:
            ne = nb + (
                round(2.001 / iters_per_epoch, 4) if fractional else
                1 if (epoch_based and in_loop_unit) else 2)
        opts[f'{key}.end'] = ne
    if 'T_max' in sch:
        opts[f'{key}.T_max'] = (new_len if ne is None else ne) - nb
    if 'milestones' in sch:
        opts[f'{key}.milestones'] = sorted(
            {max(1, int(round(m * g))) for m in sch['milestones']})
    return opts


def save_initial_checkpoint(cfg, path: str) -> str:
    """Build the config's model with its initialisation and save it as a
    checkpoint (to evaluate a model before any training)."""
    import importlib

    import torch
    from mmengine.registry import init_default_scope

    for mod in cfg.get('custom_imports', {}).get('imports', []):
        importlib.import_module(mod)
    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    model = registry.MODELS.build(cfg.model)
    model.init_weights()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(epoch=0, iter=0)), path)
    return path


# ===================================================================== #
# The demo's schedule (``make demo``, ``tools/demo.py``)                 #
# ===================================================================== #
#: The demo's BiFormer: the real backbone class (``arch`` given as a dict,
#: as any user may) with every stage kind of the official models (bi-level
#: routing attention with top-k 1, 4 and 16 regions, then global attention
#: with LePE) but fewer and narrower blocks: about 1/20 of BiFormer-T's
#: compute, so that a 2-core CPU trains all three tasks in minutes.
DEMO_ARCH = dict(
    embed_dims=[32, 64, 128, 256],
    depths=[1, 1, 2, 1],
    head_dim=32,
    mlp_ratios=[3, 3, 3, 3],
    topks=[1, 4, 16, -2])

#: THE DEMO SCHEDULE. ``make demo`` runs the real configs with these
#: changes, and nothing else changes them. They turn the paper's
#: 8-GPU, days-long recipes into minutes on a 2-core CPU:
#:
#: * model: the demo architecture ``DEMO_ARCH`` for all three tasks, no
#:   drop path, and ``n_win`` chosen for the small images (a stage-3 map
#:   of ``n_win`` x ``n_win`` regions of one token; n_win does not change
#:   the weights, only how a map is cut into regions); the necks and heads
#:   keep their types and structure with ``channels`` feature channels
#:   (FPN outputs, RPN, RoI feature and mask-head convolutions, Semantic
#:   FPN head) instead of 256 (128 in Semantic FPN's head), and Mask
#:   R-CNN's two shared box layers have ``fc_channels`` instead of 1024;
#: * image size: ``img_size`` (the built-in images are drawn at that
#:   size);
#: * classes: those of the built-in data (:func:`demo_classes`; 6 object
#:   classes, and 3 stuff classes for segmentation): ``num_classes`` and the
#:   datasets' ``metainfo`` name them (a subset of ImageNet's, COCO's and
#:   ADE20K's class lists, which mmdet and mmseg map labels to);
#: * classification: no Mixup/CutMix, RandAugment, random erasing, repeated
#:   augmentation or EMA (kept: random resized crops, flips, label
#:   smoothing, AdamW with the recipe's weight decay and gradient clipping);
#: * detection and segmentation: the backbone starts from the demo's
#:   classifier (``init_cfg=dict(type='Pretrained', ...)``), as the real
#:   workflow starts from ImageNet weights;
#: * Semantic FPN: the images are resized by ``resize_ratio`` (1-1.5x,
#:   not 0.5-2x) before the crop, and the photometric distortion is off;
#:   the cross-entropy weighs the object classes ``object_weight`` times
#:   the ``stuff`` classes (each object class covers 1-3 % of the pixels,
#:   each stuff class about 30 %: unweighted, the head learned the stuff
#:   and predicted no pixel of five of the six object classes). mmseg's
#:   class-weighted loss cannot take ignored (255) pixels, so no crop may
#:   need padding: the ratio starts at 1 (the built-in labels have no
#:   ignored pixels);
#: * Mask R-CNN: anchors of ``anchor_scale`` x stride (the objects are
#:   15-60 px, the recipe's 8 x stride is made for COCO's 800 px images);
#:   ``rpn_rois`` proposals kept per image in training and ``rcnn_rois``
#:   of them sampled for the box and mask heads (not 2000 / 512), 100
#:   proposals at test time (not 1000): the images hold 1-5 objects;
#:   at most ``max_dets`` detections per image (not 100);
#: * schedule: ``epochs``/``iters`` with ``batch_size``, AdamW at ``lr``
#:   after a linear warm-up of ``warmup`` iterations (from 1/10 of it),
#:   then cosine decay to ``lr / 100``; no validation during training
#:   (``tools/test.py`` evaluates the last checkpoint); every run seeded
#:   with ``seed`` (``randomness=dict(seed=...)``; the built-in data is
#:   deterministic too).
DEMO_SCHEDULE = dict(
    cls=dict(
        config='configs/classification/biformer_t_in1k.py',
        arch=DEMO_ARCH, img_size=64, n_win=4, batch_size=32, epochs=16,
        lr=2e-3, warmup=30, workers=1, seed=0),
    det=dict(
        config='configs/detection/maskrcnn_biformer_s_coco.py',
        arch=DEMO_ARCH, img_size=128, n_win=8, batch_size=4, epochs=3,
        lr=8e-4, warmup=50, workers=1, seed=0, channels=64,
        fc_channels=256, anchor_scale=4, rpn_rois=300, rcnn_rois=64,
        max_dets=20),
    seg=dict(
        config='configs/segmentation/semfpn_biformer_s_ade20k.py',
        arch=DEMO_ARCH, img_size=128, n_win=8, batch_size=8, iters=450,
        lr=2e-3, warmup=30, workers=1, seed=0, channels=64,
        resize_ratio=(1.0, 1.5), stuff=('wall', 'sky', 'floor'),
        object_weight=3.0),
)

def _cosine_schedule(warmup: int, total: int, lr: float) -> list:
    """Linear warm-up over ``warmup`` iterations from lr/10, then cosine
    decay to lr/100 at ``total`` (iteration-based, any loop)."""
    warmup = max(2, min(warmup, total - 1))
    return [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup,
             end=total, T_max=total - warmup, eta_min=lr / 100),
    ]


def _optimizer(cfg, lr: float) -> dict:
    """The recipe's optimizer wrapper with the demo LR (AdamW kept)."""
    ow = copy.deepcopy(cfg.optim_wrapper.to_dict()
                       if hasattr(cfg.optim_wrapper, 'to_dict')
                       else dict(cfg.optim_wrapper))
    ow['optimizer']['lr'] = lr
    ow['_delete_'] = True
    return ow


def demo_overrides(cfg, task: str, root: str = 'data/demo',
                   init_checkpoint: Optional[str] = None,
                   n_train: Optional[int] = None) -> dict:
    """The nested overrides that turn the real config ``cfg`` of ``task``
    into the demo's run (see :data:`DEMO_SCHEDULE`)."""
    spec = DEMO_SCHEDULE[task]
    s = spec['img_size']
    data_root = osp.join(root, DATA_DIRS[task]) + '/'
    if n_train is None:
        n_train = demo_train_images(root, task)
    bs, workers = spec['batch_size'], spec['workers']
    if 'epochs' in spec:
        iters_per_epoch = math.ceil(n_train / bs)
        total = spec['epochs'] * iters_per_epoch
        length = spec['epochs']
        train_cfg = dict(max_epochs=length)
    else:
        total = length = spec['iters']
        train_cfg = dict(max_iters=length)
    loader = dict(num_workers=workers, persistent_workers=workers > 0)
    # (a dict replaces the config's arch name)
    arch = dict(copy.deepcopy(spec['arch']), _delete_=True)
    dims = list(arch['embed_dims'])
    backbone = dict(arch=arch, n_win=spec['n_win'], drop_path_rate=0.)
    if task != 'cls':
        backbone['init_cfg'] = (
            dict(type='Pretrained', checkpoint=init_checkpoint)
            if init_checkpoint else None)
    out = dict(
        model=dict(backbone=backbone),
        optim_wrapper=_optimizer(cfg, spec['lr']),
        param_scheduler=_cosine_schedule(spec['warmup'], total, spec['lr']),
        train_cfg=train_cfg,
        default_hooks=dict(
            logger=dict(interval=10),
            checkpoint=dict(interval=length, max_keep_ckpts=1)),
        randomness=dict(seed=spec['seed']),
        custom_hooks=[],
        # no validation loop in training (mmengine would validate after the
        # last epoch): tools/test.py evaluates the last checkpoint
        val_dataloader=None, val_cfg=None, val_evaluator=None,
    )
    # the classes of the built-in data (``num_classes`` and their names)
    classes = demo_classes(root, task)
    meta = dict(classes=classes)
    if task == 'cls':
        out['model'].update(
            head=dict(num_classes=len(classes), in_channels=dims[-1]),
            train_cfg=None)  # no Mixup / CutMix
        out['train_dataloader'] = dict(
            batch_size=bs, **loader,
            sampler=dict(_delete_=True, type='DefaultSampler', shuffle=True),
            dataset=dict(data_root=data_root, metainfo=meta, pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='RandomResizedCrop', scale=s,
                     crop_ratio_range=(0.5, 1.0), backend='pillow',
                     interpolation='bicubic'),
                dict(type='RandomFlip', prob=0.5, direction='horizontal'),
                dict(type='PackInputs'),
            ]))
        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=s, edge='short', backend='pillow',
                 interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=s),
            dict(type='PackInputs'),
        ]
        out['test_dataloader'] = dict(batch_size=64, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=test_pipeline))
        out['test_evaluator'] = dict(type='Accuracy', topk=(1, ))
    elif task == 'det':
        c, fc = spec['channels'], spec['fc_channels']
        roi = dict(out_channels=c)
        out['model'].update(
            neck=dict(in_channels=dims, out_channels=c),
            rpn_head=dict(in_channels=c, feat_channels=c,
                          anchor_generator=dict(
                              scales=[spec['anchor_scale']])),
            roi_head=dict(
                bbox_roi_extractor=roi, mask_roi_extractor=roi,
                bbox_head=dict(in_channels=c, fc_out_channels=fc,
                               num_classes=len(classes)),
                mask_head=dict(in_channels=c, conv_out_channels=c,
                               num_classes=len(classes))),
            train_cfg=dict(
                rpn_proposal=dict(nms_pre=2 * spec['rpn_rois'],
                                  max_per_img=spec['rpn_rois']),
                rcnn=dict(sampler=dict(num=spec['rcnn_rois']))),
            test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100),
                          rcnn=dict(max_per_img=spec['max_dets'])))
        out['train_dataloader'] = dict(
            batch_size=bs, **loader, dataset=dict(
                data_root=data_root, metainfo=meta, pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='LoadAnnotations', with_bbox=True,
                         with_mask=True),
                    dict(type='Resize', scale=(s, s), keep_ratio=True),
                    dict(type='RandomFlip', prob=0.5),
                    dict(type='PackDetInputs'),
                ]))
        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(s, s), keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                            'scale_factor')),
        ]
        ann = osp.join(data_root, 'annotations', 'instances_val2017.json')
        out['test_dataloader'] = dict(batch_size=4, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=test_pipeline))
        out['test_evaluator'] = dict(ann_file=ann)
    else:  # seg
        c = spec['channels']
        out['model'].update(
            data_preprocessor=dict(size=(s, s)),
            neck=dict(in_channels=dims, out_channels=c),
            decode_head=dict(
                in_channels=[c] * len(dims), channels=c,
                num_classes=len(classes),
                loss_decode=dict(class_weight=[
                    1.0 if name in spec['stuff'] else spec['object_weight']
                    for name in classes])))
        out['train_dataloader'] = dict(
            batch_size=bs, **loader, dataset=dict(
                data_root=data_root, metainfo=meta, pipeline=[
                    dict(type='LoadImageFromFile'),
                    dict(type='LoadAnnotations', reduce_zero_label=True),
                    dict(type='RandomResize', scale=(4 * s, s),
                         ratio_range=spec['resize_ratio'], keep_ratio=True),
                    dict(type='RandomCrop', crop_size=(s, s),
                         cat_max_ratio=0.75),
                    dict(type='RandomFlip', prob=0.5),
                    dict(type='PackSegInputs'),
                ]))
        test_pipeline = [
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(4 * s, s), keep_ratio=True),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs'),
        ]
        out['test_dataloader'] = dict(batch_size=1, **loader, dataset=dict(
            data_root=data_root, metainfo=meta, pipeline=test_pipeline))
    return out


def demo_config(task: str, root: str = 'data/demo',
                init_checkpoint: Optional[str] = None,
                repo: str = '.'):
    """The real config of ``task`` with the demo's overrides merged in."""
    from .launch import load_config
    spec = DEMO_SCHEDULE[task]
    cfg = load_config(osp.join(repo, spec['config']))
    cfg.merge_from_dict(demo_overrides(cfg, task, root, init_checkpoint))
    return cfg


def validation_image(root: str, task: str) -> str:
    """A validation image of the built-in data (the demo draws on it)."""
    d = osp.join(root, DATA_DIRS[task])
    if task == 'cls':
        with open(osp.join(d, 'meta', 'val.txt')) as f:
            return osp.join(d, 'val', f.readline().split()[0])
    if task == 'det':
        import json
        with open(osp.join(d, 'annotations', 'instances_val2017.json')) as f:
            data = json.load(f)
        counts = {}
        for a in data['annotations']:
            counts[a['image_id']] = counts.get(a['image_id'], 0) + 1
        # the first image with the most objects
        best = max(data['images'], key=lambda i: counts.get(i['id'], 0))
        return osp.join(d, 'val2017', best['file_name'])
    img_dir = osp.join(d, 'images', 'validation')
    return osp.join(img_dir, sorted(os.listdir(img_dir))[0])


def _det_chance(root: str, n_boxes: int = 10, seed: int = 0) -> float:
    """COCO box mAP of random boxes: per validation image ``n_boxes``
    boxes of training-set sizes at random places, with random classes of
    the training set and random scores."""
    import contextlib
    import io
    import json

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    d = osp.join(root, DATA_DIRS['det'], 'annotations')
    with open(osp.join(d, 'instances_train2017.json')) as f:
        train = json.load(f)['annotations']
    sizes = np.array([a['bbox'][2:] for a in train])
    cats = sorted({a['category_id'] for a in train})
    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(osp.join(d, 'instances_val2017.json'))
        dets = []
        for img in gt.dataset['images']:
            for _ in range(n_boxes):
                w, h = sizes[rng.integers(len(sizes))]
                x = rng.uniform(0, max(1., img['width'] - w))
                y = rng.uniform(0, max(1., img['height'] - h))
                dets.append(dict(image_id=img['id'],
                                 category_id=int(rng.choice(cats)),
                                 bbox=[x, y, float(w), float(h)],
                                 score=float(rng.random())))
        ev = COCOeval(gt, gt.loadRes(dets), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(0., ev.stats[0]))


def _seg_baseline(root: str) -> dict:
    """mIoU and pixel accuracy of labelling every pixel with the most
    frequent training class (mmseg's way: labels 1..150 -> 0..149, 0
    ignored; IoU averaged over the classes in the labels or the
    prediction)."""
    import numpy as np
    from PIL import Image

    d = osp.join(root, DATA_DIRS['seg'], 'annotations')

    def histogram(split):
        counts = np.zeros(256, np.int64)
        for name in sorted(os.listdir(osp.join(d, split))):
            lab = np.asarray(Image.open(osp.join(d, split, name)))
            counts += np.bincount(lab.ravel(), minlength=256)
        return counts[1:151]  # 0 is ignored (reduce_zero_label)

    majority = int(np.argmax(histogram('training')))
    val = histogram('validation')
    present = set(np.nonzero(val)[0].tolist()) | {majority}
    iou = val[majority] / val.sum()
    try:
        from mmseg.datasets import ADE20KDataset
        name = ADE20KDataset.METAINFO['classes'][majority]
    except ImportError:
        name = str(majority)
    return dict(mIoU=100 * iou / len(present), aAcc=100 * iou,
                majority=name)


def chance_levels(root: str, tasks=('cls', 'det', 'seg')) -> dict:
    """What each demo metric is when nothing was learned: top-1 of a
    uniform guess, box mAP of random boxes, mIoU of the majority class."""
    out = {}
    if 'cls' in tasks:
        n = len(os.listdir(osp.join(root, DATA_DIRS['cls'], 'train')))
        out['cls'] = dict(top1=100 / n, n_classes=n)
    if 'det' in tasks:
        out['det'] = dict(bbox_mAP=_det_chance(root))
    if 'seg' in tasks:
        out['seg'] = _seg_baseline(root)
    return out
