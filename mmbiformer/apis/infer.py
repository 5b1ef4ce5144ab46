"""Image inference with the toolboxes' Inferencers (``tools/infer.py``).

The config's ``default_scope`` picks the Inferencer:

========== ===================================== ==========================
scope      Inferencer                            what is drawn
========== ===================================== ==========================
mmpretrain ``ImageClassificationInferencer``     the top-5 classes, scores
mmdet      ``DetInferencer``                     boxes (and masks), scores
mmseg      ``MMSegInferencer``                   the class map as an overlay
========== ===================================== ==========================

A checkpoint may be one of this project's (``tools/train.py``), a file
converted by ``tools/model_converters/biformer_official2mm.py`` or an
official BiFormer release file: official files are converted in memory (see
:mod:`mmbiformer.models.checkpoint`). Before anything is drawn the
checkpoint is checked against the model the config builds: a backbone of
another architecture (e.g. BiFormer-T weights for a BiFormer-S config), or
weights of another model (a classifier for a detector, another number of
classes) are errors, not warnings.
"""
import contextlib
import copy
import importlib
import logging
import os
import os.path as osp
import re
import tempfile
from typing import Dict, List, Optional, Tuple

#: default_scope -> (module, Inferencer class)
INFERENCERS = dict(
    mmpretrain=('mmpretrain.apis', 'ImageClassificationInferencer'),
    mmdet=('mmdet.apis', 'DetInferencer'),
    mmseg=('mmseg.apis', 'MMSegInferencer'),
)


class InferenceInputError(ValueError):
    """Input that the infer command cannot use; the message says why."""


class CheckpointMismatchError(InferenceInputError):
    """A checkpoint whose weights do not fit the config's model (another
    task, another head, another number of classes)."""


def check_image(path: str) -> Tuple[int, int]:
    """``(width, height)`` of the image at ``path``; a missing file is a
    ``FileNotFoundError``, a file that is not an image an
    :class:`InferenceInputError`."""
    from PIL import Image, UnidentifiedImageError

    if not osp.isfile(path):
        raise FileNotFoundError(f'Image {path!r} does not exist' + (
            ' (it is a directory)' if osp.isdir(path) else ''))
    try:
        with Image.open(path) as img:
            img.verify()
            size = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InferenceInputError(
            f'{path!r} is not an image that can be read '
            f'({type(err).__name__}: {err})') from err
    return size


def load_infer_config(path: str, cfg_options: Optional[dict] = None):
    """Load a config and check that its scope has an Inferencer."""
    from mmengine.config import Config

    if not osp.isfile(path):
        raise FileNotFoundError(f'Config {path!r} does not exist')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in INFERENCERS:
        known = ', '.join(f'{s} ({c})' for s, (_, c) in INFERENCERS.items())
        raise InferenceInputError(
            f'Config {path!r} has default_scope {scope!r}, which has no '
            f'Inferencer here; tools/infer.py runs configs of {known}')
    if cfg.get('model') is None:
        raise InferenceInputError(f'Config {path!r} defines no model')
    return cfg


def _to_cpu_norms(node) -> None:
    """SyncBN -> BN (it synchronises CUDA tensors only)."""
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        for v in node.values():
            _to_cpu_norms(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _to_cpu_norms(v)


def prepare_checkpoint(checkpoint: str, tmp_dir: str) -> Tuple[str, Dict,
                                                               str]:
    """Read ``checkpoint``; convert an official one into the OpenMMLab
    layout (written to ``tmp_dir``).

    Returns:
        tuple: the file to give the Inferencer, its state dict and the
        detected format.
    """
    import torch

    from mmbiformer.models.checkpoint import (
        MM,
        convert_official_checkpoint,
        detect_format,
        extract_state_dict,
        read_checkpoint,
    )

    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'Checkpoint {checkpoint!r} does not exist')
    ckpt = read_checkpoint(checkpoint)
    try:
        state, _ = extract_state_dict(ckpt)
        fmt = detect_format(state)
    except (TypeError, ValueError) as err:
        raise CheckpointMismatchError(
            f'Checkpoint {checkpoint!r} is not a BiFormer checkpoint: '
            f'{err}') from err
    if fmt == MM:
        return checkpoint, state, fmt
    converted, fmt = convert_official_checkpoint(ckpt)
    path = osp.join(tmp_dir, 'converted_' + osp.basename(checkpoint))
    torch.save(converted, path)
    return path, converted['state_dict'], fmt


def _strip(state: Dict, prefix: str) -> Dict:
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix)}


def check_checkpoint_fits(model_state: Dict, ckpt_state: Dict,
                          checkpoint: str, config: str) -> None:
    """Raise if the checkpoint's weights are not those of the model.

    * a backbone of another architecture:
      :class:`~mmbiformer.models.checkpoint.ArchitectureMismatchError`
      naming both;
    * weights of the model that the checkpoint does not have, or has in
      another shape (a classifier for a detector, another number of
      classes): :class:`CheckpointMismatchError` with examples.
    """
    from mmbiformer.models.checkpoint import check_architecture

    check_architecture(_strip(model_state, 'backbone.'),
                       _strip(ckpt_state, 'backbone.'), checkpoint)
    missing = [k for k in model_state if k not in ckpt_state]
    shapes = [f'{k}: checkpoint {tuple(ckpt_state[k].shape)} vs model '
              f'{tuple(v.shape)}' for k, v in model_state.items()
              if k in ckpt_state and tuple(ckpt_state[k].shape) !=
              tuple(v.shape)]
    if not missing and not shapes:
        return
    parts = []
    if missing:
        groups = sorted({re.sub(r'\.\d+\..*$|\.[^.]+$', '', k)
                         for k in missing})
        parts.append(f'{len(missing)} of the model\'s {len(model_state)} '
                     f'tensors are not in it (under {groups[:6]})')
    if shapes:
        parts.append(f'{len(shapes)} have another shape (e.g. '
                     f'{shapes[:3]})')
    only_backbone = missing and all(k.startswith('backbone.') or
                                    k.startswith('head.')
                                    for k in ckpt_state)
    hint = (' It looks like a classifier (ImageNet) checkpoint: use it as '
            "the backbone's init_cfg=dict(type='Pretrained', checkpoint=...) "
            'for training, not for inference with this config.'
            if only_backbone and any(not k.startswith(('backbone.', 'head.'))
                                     for k in model_state) else
            ' Was it trained with another config?')
    raise CheckpointMismatchError(
        f'Checkpoint {checkpoint!r} does not fit the model of {config!r}: '
        + '; '.join(parts) + '.' + hint)


@contextlib.contextmanager
def _quiet_mmengine():
    """Silence mmengine's logger (the load warnings that the check then
    turns into one error)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    handlers = [(h, h.level) for h in logger.handlers]
    logger.setLevel(logging.ERROR)
    for h, _ in handlers:
        h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for h, lvl in handlers:
            h.setLevel(lvl)


def build_inferencer(cfg, weights: Optional[str], device: str):
    """The Inferencer of the config's scope with the given weights."""
    import warnings

    import mmbiformer  # noqa: F401 (registries)

    module, name = INFERENCERS[cfg.default_scope]
    cls = getattr(importlib.import_module(module), name)
    with warnings.catch_warnings(), _quiet_mmengine():
        warnings.simplefilter('ignore')
        if cfg.default_scope == 'mmpretrain':
            return cls(model=cfg, pretrained=weights or False,
                       device=device)
        return cls(model=cfg, weights=weights, device=device)


def _classes(inferencer) -> List[str]:
    model = inferencer.model
    meta = getattr(model, 'dataset_meta', None) or \
        getattr(model, '_dataset_meta', None) or {}
    classes = getattr(inferencer, 'classes', None) or meta.get('classes')
    return list(classes) if classes is not None else []


def _draw_classification(inferencer, image: str, out_dir: str, topk: int
                         ) -> Tuple[str, List[str]]:
    """Top-k classes of one image drawn on it and as text lines."""
    import mmcv
    import torch

    (sample, ) = inferencer(image, return_datasamples=True)
    scores = sample.pred_score.detach().float().cpu()
    k = min(topk, scores.numel())
    top = torch.topk(scores, k)
    classes = _classes(inferencer)
    lines = []
    for rank, (score, label) in enumerate(zip(top.values.tolist(),
                                              top.indices.tolist())):
        name = classes[label] if label < len(classes) else str(label)
        lines.append(f'{rank + 1}. {name} ({score:.3f})')
    drawn = copy.deepcopy(sample)
    drawn.set_pred_label(top.indices)
    img = mmcv.imread(image, channel_order='rgb')
    out_file = osp.join(out_dir, 'vis',
                        osp.splitext(osp.basename(image))[0] + '.png')
    os.makedirs(osp.dirname(out_file), exist_ok=True)
    h, w = img.shape[:2]
    if inferencer.visualizer is None:  # mmpretrain builds it on first use
        from mmpretrain.visualization import UniversalVisualizer
        inferencer.visualizer = UniversalVisualizer()
    inferencer.visualizer.visualize_cls(
        img, drawn, classes=classes or None, draw_gt=False, draw_score=True,
        rescale_factor=max(1., 320 / max(1, min(h, w))), out_file=out_file)
    return out_file, lines


def _describe_detection(result: dict, classes: List[str], thr: float
                        ) -> List[str]:
    lines = []
    for label, score, box in zip(result['labels'], result['scores'],
                                 result['bboxes']):
        if score < thr:
            continue
        name = classes[label] if label < len(classes) else str(label)
        x0, y0, x1, y1 = (round(v) for v in box)
        lines.append(f'{name} ({score:.2f}) at [{x0}, {y0}, {x1}, {y1}]')
    return lines or [f'no detection with score >= {thr}']


def _describe_segmentation(result: dict, classes: List[str]) -> List[str]:
    import numpy as np
    pred = np.asarray(result['predictions'])
    labels, counts = np.unique(pred, return_counts=True)
    order = np.argsort(-counts)
    return [f'{classes[labels[i]] if labels[i] < len(classes) else labels[i]}'
            f': {100 * counts[i] / pred.size:.1f} % of the pixels'
            for i in order[:8]]


def infer(image: str, config: str, checkpoint: Optional[str] = None,
          out_dir: str = 'outputs', device: Optional[str] = None,
          score_thr: float = 0.3, topk: int = 5,
          cfg_options: Optional[dict] = None, log=print) -> dict:
    """Predict on one image and draw the prediction.

    Returns:
        dict: ``task`` (the scope), ``out_file`` (the drawn picture),
        ``lines`` (the prediction as text), ``format`` (of the checkpoint).
    """
    import torch

    check_image(image)
    cfg = load_infer_config(config, cfg_options)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if not device.startswith('cuda'):
        _to_cpu_norms(cfg.model)
    cfg.model.setdefault('backbone', {})
    scope = cfg.default_scope
    with tempfile.TemporaryDirectory() as tmp:
        weights, fmt, state = None, None, None
        if checkpoint is not None:
            weights, state, fmt = prepare_checkpoint(checkpoint, tmp)
            log(f'[infer] checkpoint {checkpoint} (format {fmt})')
        else:
            log('[infer] no checkpoint given: the model has random weights')
        log(f'[infer] building {INFERENCERS[scope][1]} ({scope}) from '
            f'{config} on {device}')
        inferencer = build_inferencer(cfg, weights, device)
    if state is not None:
        check_checkpoint_fits(inferencer.model.state_dict(), state,
                              checkpoint, config)
    classes = _classes(inferencer)
    if scope == 'mmpretrain':
        out_file, lines = _draw_classification(inferencer, image, out_dir,
                                               topk)
    elif scope == 'mmdet':
        res = inferencer(image, out_dir=out_dir, pred_score_thr=score_thr,
                         no_save_pred=True)
        out_file = osp.join(out_dir, 'vis', osp.basename(image))
        lines = _describe_detection(res['predictions'][0], classes,
                                    score_thr)
    else:
        res = inferencer(image, out_dir=out_dir)
        out_file = osp.join(out_dir, 'vis', osp.basename(image))
        pred = res['predictions'] if isinstance(res, dict) else res
        if isinstance(pred, list):
            pred = pred[0]
        lines = _describe_segmentation(dict(predictions=pred), classes)
    if not osp.isfile(out_file):
        raise RuntimeError(f'the Inferencer did not write {out_file!r}')
    return dict(task=scope, out_file=out_file, lines=lines, format=fmt)
