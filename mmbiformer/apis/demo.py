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
    import os
    return len(os.listdir(osp.join(d, 'images', 'training')))


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
    import os

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
