"""Token-labeling data: the teacher's dense label maps, read and kept aligned
with the augmented image (Jiang et al., "All Tokens Matter: Token Labeling
for Training Better Vision Transformers", NeurIPS 2021).

Label files
    One file per training image, ``<label_root>/<class folder>/<stem>.pt``
    (the image ``<data>/train/n01440764/n01440764_10026.JPEG`` has the file
    ``<label_root>/n01440764/n01440764_10026.pt``), holding one tensor of
    shape ``(2, k, H, W)``: ``[0]`` the teacher's top-k raw logits (not
    probabilities) and ``[1]`` their class indices, at each location of the
    teacher's output grid (``H`` rows, ``W`` columns; ``k = 5`` and float16
    in the released ImageNet files made by NFNet-F6 at 576 px, which are
    read unchanged). ``tools/dataset_converters/make_token_labels.py``
    writes the same format from any mmpretrain classifier.

Alignment
    The map is never resampled until the end: the transforms track which
    part of it the current image shows, as a box ``(x1, y1, x2, y2)`` in
    fractions of the map's width and height (``results['token_label_box']``,
    ``[0, 0, 1, 1]`` after loading, as the teacher saw the whole image).
    :class:`TokenLabelRandomResizedCrop` narrows the box to the crop,
    :class:`TokenLabelRandomFlip` flips the map and mirrors the box, and
    :class:`ResampleTokenLabel` finally scatters the top-k entries into a
    dense ``(num_classes, H, W)`` logit map, RoI-aligns the box to the
    student's token grid (7x7 for BiFormer at 224) and turns each token's
    logits into a distribution (softmax over all classes, the classes
    outside a location's top k having logit 0, as in the original).

Photometric transforms (colour RandAugment operations, random erasing)
leave the map alone; geometric RandAugment operations (rotate, shear,
translate) would move the image without the map, so the token-labeling
recipes leave them out (:data:`PHOTOMETRIC_RANDAUG_POLICIES`).
"""
import os.path as osp
from typing import Dict, Optional, Sequence, Tuple, Union

import mmcv
import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import BaseTransform
from mmcv.transforms import RandomFlip as _RandomFlip
from mmpretrain.datasets.transforms import RandomResizedCrop as _RRC
from torchvision.ops import roi_align

#: mmpretrain's ``'timm_increasing'`` RandAugment policies without the
#: geometric ones (Rotate, Shear x/y, Translate x/y), which would move the
#: image but not its label map: AutoContrast, Equalize, Invert, Posterize,
#: Solarize, SolarizeAdd, ColorTransform, Contrast, Brightness, Sharpness.
PHOTOMETRIC_RANDAUG_POLICIES = [
    dict(type='AutoContrast'),
    dict(type='Equalize'),
    dict(type='Invert'),
    dict(type='Posterize', magnitude_range=(4, 0)),
    dict(type='Solarize', magnitude_range=(256, 0)),
    dict(type='SolarizeAdd', magnitude_range=(0, 110)),
    dict(type='ColorTransform', magnitude_range=(0, 0.9)),
    dict(type='Contrast', magnitude_range=(0, 0.9)),
    dict(type='Brightness', magnitude_range=(0, 0.9)),
    dict(type='Sharpness', magnitude_range=(0, 0.9)),
]

FULL_BOX = (0., 0., 1., 1.)


class TokenLabelFileError(ValueError):
    """A label file that cannot be used (wrong shape, dtype or indices); the
    message names the image and the file."""


def token_label_path(img_path: str, label_root: str) -> str:
    """``<label_root>/<folder of the image>/<image stem>.pt``."""
    folder = osp.basename(osp.dirname(img_path))
    stem = osp.splitext(osp.basename(img_path))[0]
    return osp.join(label_root, folder, stem + '.pt')


def load_token_label(path: str,
                     img_path: Optional[str] = None,
                     num_classes: Optional[int] = None,
                     topk: Optional[int] = None) -> torch.Tensor:
    """Read one label file and check it.

    Args:
        path: the ``.pt`` file.
        img_path: the image it belongs to (named in errors).
        num_classes: if given, every class index must be below it.
        topk: if given, the number of entries per location must be it.

    Returns:
        Tensor: ``(2, k, H, W)`` float32 (logits, then class indices).

    Raises:
        FileNotFoundError: no such file (names the image and the root).
        TokenLabelFileError: not a ``(2, k, H, W)`` floating tensor, or
            class indices that are not integers in ``[0, num_classes)``.
    """
    image = img_path if img_path is not None else '<unknown image>'
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'No token label file for image {image}: {path} does not exist '
            '(expected <label_root>/<class folder>/<image stem>.pt; check '
            'token_label_root, or write the files with '
            'tools/dataset_converters/make_token_labels.py)')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 (re-raised with the names)
        raise TokenLabelFileError(
            f'Token label file {path} of image {image} cannot be read '
            f'({type(err).__name__}: {err})') from err
    if not isinstance(data, torch.Tensor):
        raise TokenLabelFileError(
            f'Token label file {path} of image {image} holds a '
            f'{type(data).__name__}, not a tensor of shape [2, k, H, W]')
    if data.dim() != 4 or data.shape[0] != 2 or min(data.shape) == 0 or \
            (topk is not None and data.shape[1] != topk):
        want = f'[2, {topk}, H, W]' if topk else '[2, k, H, W]'
        raise TokenLabelFileError(
            f'Token label file {path} of image {image} has shape '
            f'{list(data.shape)}, expected {want} (top-k logits and their '
            'class indices on the teacher\'s output grid)')
    if not data.is_floating_point():
        raise TokenLabelFileError(
            f'Token label file {path} of image {image} is {data.dtype}; '
            'expected a floating tensor (float16 in the released files)')
    data = data.float()
    index = data[1]
    bad = (index != index.round()) | (index < 0)
    if num_classes is not None:
        bad |= index >= num_classes
    if bool(bad.any()):
        raise TokenLabelFileError(
            f'Token label file {path} of image {image} has class indices '
            f'outside 0..{(num_classes or 0) - 1 if num_classes else "n"} '
            f'or not integers (e.g. {index[bad][0].item()})')
    return data


def dense_label_map(topk_map: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """Scatter ``(2, k, H, W)`` top-k entries into ``(num_classes, H, W)``
    logits (0 for the classes outside a location's top k)."""
    _, _, h, w = topk_map.shape
    dense = topk_map.new_zeros(num_classes, h, w)
    return dense.scatter_(0, topk_map[1].long(), topk_map[0])


def align_label_map(topk_map: torch.Tensor,
                    box: Sequence[float],
                    output_size: Union[int, Tuple[int, int]],
                    num_classes: int) -> torch.Tensor:
    """The logits of the box's region, resampled to the token grid.

    Args:
        topk_map: ``(2, k, H, W)`` label map.
        box: ``(x1, y1, x2, y2)`` in fractions of the map's width (x) and
            height (y).
        output_size: token grid ``(h, w)`` (or one int for both).
        num_classes: classes of the dense map.

    Returns:
        Tensor: ``(num_classes, h, w)``; token ``(i, j)`` is the RoI-align
        average of the dense logits over the ``(i, j)`` cell of the box
        (map cell ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)`` in map
        units, ``aligned=True``).
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    dense = dense_label_map(topk_map, num_classes)
    _, h, w = dense.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    rois = dense.new_tensor([[0., x1 * w, y1 * h, x2 * w, y2 * h]])
    out = roi_align(dense[None], rois, output_size=output_size,
                    spatial_scale=1., sampling_ratio=-1, aligned=True)
    return out[0]


def _box_of(results: dict) -> np.ndarray:
    return np.asarray(results.get('token_label_box', FULL_BOX),
                      dtype=np.float64)


class LoadTokenLabel(BaseTransform):
    """Read the image's label map (see the module doc for the format).

    **Required keys:** ``img_path``. **Added keys:** ``token_label``
    (``(2, k, H, W)`` float32 tensor), ``token_label_box`` (``[0, 0, 1,
    1]``: the teacher saw the whole image).

    Args:
        label_root (str): folder of the label files (one sub-folder per
            class folder of the images).
        num_classes (int, optional): check the class indices against it.
        topk (int, optional): check the entries per location (5 for the
            released files).
    """

    def __init__(self,
                 label_root: str,
                 num_classes: Optional[int] = None,
                 topk: Optional[int] = None) -> None:
        self.label_root = label_root
        self.num_classes = num_classes
        self.topk = topk

    def transform(self, results: dict) -> dict:
        img_path = results['img_path']
        path = token_label_path(img_path, self.label_root)
        results['token_label'] = load_token_label(
            path, img_path, num_classes=self.num_classes, topk=self.topk)
        results['token_label_box'] = np.array(FULL_BOX)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(label_root={self.label_root!r}, '
                f'num_classes={self.num_classes}, topk={self.topk})')


class TokenLabelRandomResizedCrop(_RRC):
    """mmpretrain's ``RandomResizedCrop`` that also narrows
    ``token_label_box`` to the crop (same arguments, same random draws).

    A crop of columns ``[left, left + crop_w)`` and rows ``[top, top +
    crop_h)`` of a ``W x H`` image narrows the box ``(x1, y1, x2, y2)`` of
    the region the image showed to ``x1' = x1 + (x2 - x1) * left / W``,
    ``x2' = x1 + (x2 - x1) * (left + crop_w) / W`` and likewise in y with
    ``top``, ``crop_h`` and ``H`` (so crops compose). x is the column
    direction, y the row direction, in the image and in the map alike.
    """

    def transform(self, results: dict) -> dict:
        img = results['img']
        h, w = img.shape[:2]
        top, left, crop_h, crop_w = self.rand_crop_params(img)
        img = mmcv.imcrop(
            img,
            bboxes=np.array(
                [left, top, left + crop_w - 1, top + crop_h - 1]))
        results['img'] = mmcv.imresize(
            img,
            tuple(self.scale[::-1]),
            interpolation=self.interpolation,
            backend=self.backend)
        results['img_shape'] = results['img'].shape
        if 'token_label' in results:
            bx1, by1, bx2, by2 = _box_of(results)
            sx, sy = (bx2 - bx1) / w, (by2 - by1) / h
            results['token_label_box'] = np.array([
                bx1 + left * sx, by1 + top * sy, bx1 + (left + crop_w) * sx,
                by1 + (top + crop_h) * sy
            ])
        return results


class TokenLabelRandomFlip(_RandomFlip):
    """mmcv's ``RandomFlip`` that flips ``token_label`` with the image and
    mirrors ``token_label_box`` (same arguments, same random draws)."""

    def _flip(self, results: dict) -> None:
        super()._flip(results)
        if 'token_label' not in results:
            return
        direction = results['flip_direction']
        x1, y1, x2, y2 = _box_of(results)
        label = results['token_label']
        if direction in ('horizontal', 'diagonal'):
            label = label.flip(-1)
            x1, x2 = 1. - x2, 1. - x1
        if direction in ('vertical', 'diagonal'):
            label = label.flip(-2)
            y1, y2 = 1. - y2, 1. - y1
        results['token_label'] = label
        results['token_label_box'] = np.array([x1, y1, x2, y2])


class ResampleTokenLabel(BaseTransform):
    """Turn the tracked label map into the student's targets.

    **Required keys:** ``token_label``, ``token_label_box``.
    **Added keys:** ``gt_token_label`` (``(num_classes, h, w)`` float32:
    each token's soft label, the softmax of the RoI-aligned logits) and,
    with ``crop_label=True``, ``gt_score`` (``(num_classes, )``: the
    teacher's label of the whole crop, the softmax of the 1x1 RoI-align:
    the image-level target of the original recipe; mmpretrain's heads and
    data preprocessor take ``gt_score`` as the soft image label).
    **Removed keys:** ``token_label``, ``token_label_box``.

    Pack the targets with ``dict(type='PackInputs',
    algorithm_keys=['gt_token_label'])``.

    Args:
        num_classes (int): classes of the teacher (and of the student).
        output_size (int | tuple): the student's final token grid ``(h,
            w)``: 7 for BiFormer at 224 (input / 32).
        crop_label (bool): also write ``gt_score``. Defaults to True.
    """

    def __init__(self,
                 num_classes: int,
                 output_size: Union[int, Tuple[int, int]] = 7,
                 crop_label: bool = True) -> None:
        self.num_classes = num_classes
        self.output_size = output_size
        self.crop_label = crop_label

    def transform(self, results: dict) -> dict:
        label = results.pop('token_label')
        box = results.pop('token_label_box', FULL_BOX)
        logits = align_label_map(label, box, self.output_size,
                                 self.num_classes)
        results['gt_token_label'] = F.softmax(logits, dim=0)
        if self.crop_label:
            crop = align_label_map(label, box, 1, self.num_classes)
            results['gt_score'] = F.softmax(crop.flatten(), dim=0)
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, '
                f'output_size={self.output_size}, '
                f'crop_label={self.crop_label})')


#: name -> class, registered into mmpretrain's TRANSFORMS by
#: :mod:`mmbiformer.registry`
TRANSFORMS: Dict[str, type] = {
    'LoadTokenLabel': LoadTokenLabel,
    'TokenLabelRandomResizedCrop': TokenLabelRandomResizedCrop,
    'TokenLabelRandomFlip': TokenLabelRandomFlip,
    'ResampleTokenLabel': ResampleTokenLabel,
}
