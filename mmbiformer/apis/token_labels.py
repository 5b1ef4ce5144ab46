"""Writing token-labeling label maps with a teacher classifier (what
``tools/dataset_converters/make_token_labels.py`` runs).

For every image of a folder tree the teacher sees the whole image resized
to ``size x size``; its classifier is applied at every location of the
last feature map (for a global-average-pooling neck and a linear head that
is the same linear map as on the pooled feature; for
:class:`~mmbiformer.models.token_labeling.TokenLabelClsHead` the
auxiliary token head, as the original generated labels with a token-labeled
teacher), and the top-k logits and their class indices are saved as
``<out>/<class folder>/<stem>.pt``, a float16 ``(2, k, H, W)`` tensor: the
format of the released ImageNet label files
(:mod:`mmbiformer.datasets.token_label`).
"""
import math
import os
import os.path as osp
from typing import Iterable, List, Optional, Sequence

import mmcv
import numpy as np
import torch
import torch.nn as nn

from ..datasets.token_label import (
    align_label_map,
    dense_label_map,
    load_token_label,
    token_label_path,
)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
#: float16 holds every integer up to 2048 exactly (the class indices)
FLOAT16_MAX_INDEX = 2048


def list_images(root: str) -> List[str]:
    """Image files under ``root`` (any depth), sorted."""
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(osp.join(folder, name))
    if not found:
        raise FileNotFoundError(
            f'No images ({", ".join(IMAGE_EXTENSIONS)}) under {root}')
    return sorted(found)


def dense_class_logits(model: nn.Module,
                       inputs: torch.Tensor) -> torch.Tensor:
    """The classifier's logits at every location of its last feature map.

    Args:
        model: an mmpretrain ``ImageClassifier`` (or subclass) whose head
            is ``TokenLabelClsHead`` (its token head is used), or a head
            with a linear ``fc`` after a global-average-pooling neck (or no
            neck), e.g. ``LinearClsHead``.
        inputs: (N, 3, H, W) normalised images.

    Returns:
        Tensor: (N, K, h, w) logits.
    """
    from ..models.token_labeling import TokenLabelClsHead

    head = getattr(model, 'head', None)
    neck = getattr(model, 'neck', None)
    feats = model.backbone(inputs)
    x = feats[-1] if isinstance(feats, (tuple, list)) else feats
    if x.dim() != 4:
        raise ValueError(f'The teacher backbone gives a {x.dim()}-D output '
                         '(need an (N, C, h, w) feature map)')
    if isinstance(head, TokenLabelClsHead):
        fc = head.aux_fc
    else:
        neck_ok = neck is None or type(neck).__name__ == \
            'GlobalAveragePooling'
        from mmpretrain.models.heads import LinearClsHead
        fc = getattr(head, 'fc', None)
        if not (neck_ok and isinstance(head, LinearClsHead)):
            raise ValueError(
                'make_token_labels needs a classifier whose score is a '
                'linear map of the average-pooled last feature map '
                '(GlobalAveragePooling neck or none, LinearClsHead) or a '
                f'TokenLabelClsHead; got neck '
                f'{type(neck).__name__} and head {type(head).__name__}')
    return fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _load(path: str, size: int) -> torch.Tensor:
    img = mmcv.imread(path, channel_order='bgr')
    if img is None:
        raise ValueError(f'Cannot read image {path}')
    img = mmcv.imresize(img, (size, size), interpolation='bicubic',
                        backend='pillow')
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def batches(items: Sequence[str], size: int) -> Iterable[List[str]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@torch.no_grad()
def write_token_labels(model: nn.Module,
                       image_root: str,
                       out_root: str,
                       size: int = 224,
                       topk: int = 5,
                       batch_size: int = 32,
                       skip_existing: bool = False,
                       progress: bool = True) -> int:
    """Write a label file for every image under ``image_root``.

    Args:
        model: the teacher, an mmpretrain classifier (see
            :func:`dense_class_logits`) with its data preprocessor.
        image_root: folder of class folders of images.
        out_root: where ``<class folder>/<stem>.pt`` files go.
        size: the teacher's input side (the whole image is resized to it).
        topk: entries kept per location (5 in the released files).
        batch_size: images per forward.
        skip_existing: keep files that exist already.
        progress: show mmengine's progress bar.

    Returns:
        int: the number of files written.
    """
    from mmengine.utils import ProgressBar

    images = list_images(image_root)
    targets = [token_label_path(p, out_root) for p in images]
    if skip_existing:
        todo = [(p, t) for p, t in zip(images, targets) if not osp.isfile(t)]
    else:
        todo = list(zip(images, targets))
    model.eval()
    bar = ProgressBar(len(todo)) if progress and todo else None
    written = 0
    for chunk in batches(todo, batch_size):
        data = dict(inputs=[_load(p, size) for p, _ in chunk])
        inputs = model.data_preprocessor(data, False)['inputs']
        logits = dense_class_logits(model, inputs).float()
        num_classes = logits.shape[1]
        if topk > num_classes:
            raise ValueError(f'topk={topk} but the teacher has only '
                             f'{num_classes} classes')
        dtype = torch.float16 if num_classes <= FLOAT16_MAX_INDEX \
            else torch.float32
        values, index = logits.topk(topk, dim=1)  # (N, k, h, w) each
        maps = torch.stack([values, index.to(values.dtype)], dim=1)
        for (_, target), label in zip(chunk, maps.to(dtype).cpu()):
            os.makedirs(osp.dirname(target), exist_ok=True)
            torch.save(label.clone(), target)
            written += 1
            if bar is not None:
                bar.update()
    if bar is not None:
        print()
    return written


def summarize_token_labels(image_root: str,
                           label_root: str,
                           num_classes: int,
                           max_images: Optional[int] = None) -> dict:
    """Read the label files of the images under ``image_root`` back and
    measure what a student would learn from them.

    The image label is the index of the image's folder among the sorted
    class folders (the ImageNet convention; meaningless for a teacher whose
    classes are ordered otherwise). Each location's target is what
    :class:`~mmbiformer.datasets.token_label.ResampleTokenLabel` makes of
    it: the softmax over all ``num_classes`` classes of the scattered top-k
    logits (0 for the other classes).

    Args:
        image_root: folder of class folders of images.
        label_root: the label files' root.
        num_classes: classes of the teacher.
        max_images: read at most this many files, evenly spaced over the
            sorted images (None: all).

    Returns:
        dict: ``files`` read, ``grid`` (H, W) and ``topk`` of the first
        file; ``entropy`` (mean over locations, nats) and ``max_entropy``
        (``ln num_classes``) of the location targets; ``max_prob`` (their
        mean largest probability); ``image_top1`` (% of images whose
        whole-map label, the 1x1 RoI-align of the map as the class target
        of an uncropped image, has the image's class as top-1) and
        ``token_top1`` (% of locations whose top-1 is the image's class).
    """
    images = list_images(image_root)
    if max_images is not None and len(images) > max_images:
        step = len(images) / max_images
        images = [images[int(i * step)] for i in range(max_images)]
    folders = sorted({osp.basename(osp.dirname(p)) for p in
                      list_images(image_root)})
    index = {f: i for i, f in enumerate(folders)}
    entropy = max_prob = 0.
    locations = image_hits = token_hits = 0
    grid = topk = None
    for path in images:
        label = load_token_label(token_label_path(path, label_root), path,
                                 num_classes=num_classes)
        gt = index[osp.basename(osp.dirname(path))]
        if grid is None:
            topk, grid = label.shape[1], tuple(label.shape[2:])
        prob = dense_label_map(label, num_classes).flatten(1).softmax(0)
        entropy += float(-(prob * prob.clamp_min(1e-12).log()).sum())
        max_prob += float(prob.max(0).values.sum())
        locations += prob.shape[1]
        token_hits += int((label[1, 0] == gt).sum())
        whole = align_label_map(label, (0., 0., 1., 1.), 1, num_classes)
        image_hits += int(int(whole.flatten().argmax()) == gt)
    n = len(images)
    return dict(files=n, grid=grid, topk=topk,
                entropy=entropy / locations,
                max_entropy=math.log(num_classes),
                max_prob=max_prob / locations,
                image_top1=100. * image_hits / n,
                token_top1=100. * token_hits / locations)


def format_label_summary(stats: dict) -> str:
    """:func:`summarize_token_labels` as one line."""
    h, w = stats['grid']
    return (f"label maps: {stats['files']} files, {h}x{w} x top-"
            f"{stats['topk']}; token targets: entropy "
            f"{stats['entropy']:.2f} nats (uniform "
            f"{stats['max_entropy']:.2f}), top probability "
            f"{stats['max_prob']:.2f}; top-1 = image label: "
            f"{stats['image_top1']:.1f} % of images (whole map), "
            f"{stats['token_top1']:.1f} % of locations")


def build_teacher(config: str,
                  checkpoint: Optional[str],
                  device: str = 'cpu',
                  cfg_options: Optional[dict] = None) -> nn.Module:
    """The teacher classifier from an mmpretrain config and checkpoint."""
    from mmengine.config import Config
    from mmpretrain.apis import init_model

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return init_model(cfg, checkpoint, device=device)
