"""ImageNet-V2 (Recht et al., 2019): three new test sets for ImageNet
models, ``matched-frequency``, ``threshold0.7`` and ``top-images``.

Each is released as one folder per class named by the class index, ``0`` to
``999``, of JPEG images. mmpretrain's ``CustomDataset`` numbers class
folders in their *string* order (``0, 1, 10, 100, 101, ...``), which gives
most images a wrong label without any error; :class:`ImageNetV2` labels the
images of folder ``i`` with class ``i``.
"""
import os
import os.path as osp
from typing import List, Optional, Tuple

from mmpretrain.datasets import CustomDataset
from mmpretrain.datasets.categories import IMAGENET_CATEGORIES
from mmpretrain.datasets.custom import get_samples

__all__ = ['IMAGENET_V2_VARIANTS', 'ImageNetV2']

#: variant -> the folder name of its release archive
IMAGENET_V2_VARIANTS = {
    'matched-frequency': 'imagenetv2-matched-frequency-format-val',
    'threshold0.7': 'imagenetv2-threshold0.7-format-val',
    'top-images': 'imagenetv2-top-images-format-val',
}


class ImageNetV2(CustomDataset):
    """ImageNet-V2 with labels from the numeric folder names.

    Args:
        data_root (str): Folder holding the extracted variant folders (or
            one variant's class folders, with ``variant=None``).
        variant (str, optional): ``'matched-frequency'``,
            ``'threshold0.7'`` or ``'top-images'``: reads
            ``data_root/imagenetv2-<variant>-format-val/``. None: reads
            ``data_root/data_prefix``.
        data_prefix (str | dict): Sub-folder of ``data_root`` with the
            class folders when ``variant`` is None.
        **kwargs: Other arguments of mmpretrain's ``CustomDataset``
            (``pipeline``, ``test_mode``, ``lazy_init``, ...). An
            ``ann_file`` (lines ``<path> <label>``) is used as it is.

    Every class folder must be named by a class index below the number of
    classes (1000 for ImageNet); other folder names raise a ``ValueError``.
    """

    METAINFO = {'classes': IMAGENET_CATEGORIES}

    def __init__(self,
                 data_root: str = '',
                 variant: Optional[str] = 'matched-frequency',
                 data_prefix='',
                 **kwargs) -> None:
        if variant is not None:
            if variant not in IMAGENET_V2_VARIANTS:
                raise ValueError(
                    f'Unknown ImageNet-V2 variant {variant!r}; choose one of '
                    f'{sorted(IMAGENET_V2_VARIANTS)} (or None with '
                    'data_prefix pointing at the class folders)')
            data_prefix = IMAGENET_V2_VARIANTS[variant]
        self.variant = variant
        super().__init__(data_root=data_root, data_prefix=data_prefix,
                         **kwargs)

    def _find_samples(self) -> List[Tuple[str, int]]:
        """``(path relative to the prefix, int(folder))`` of every image."""
        root = self.img_prefix
        if not osp.isdir(root):
            raise FileNotFoundError(
                f'ImageNet-V2 folder {root} not found; extract the release '
                f'archive (folders {sorted(IMAGENET_V2_VARIANTS.values())}) '
                'under data_root')
        folders = sorted(d for d in os.listdir(root)
                         if osp.isdir(osp.join(root, d)))
        num_classes = len(self.CLASSES) if self.CLASSES else None
        bad = [d for d in folders if not d.isdigit() or (
            num_classes is not None and int(d) >= num_classes)]
        if bad:
            raise ValueError(
                f'{root}: ImageNet-V2 class folders are named by the class '
                f'index 0..{(num_classes or 1000) - 1}; found {bad[:5]}')
        folder_to_idx = {d: int(d) for d in folders}
        self.folder_to_idx = folder_to_idx
        samples, empty = get_samples(root, folder_to_idx,
                                     is_valid_file=self.is_valid_file)
        if not samples:
            raise RuntimeError(
                f'Found no image in the class folders of {root} (extensions '
                f'{", ".join(self.extensions)})')
        if empty:
            from mmengine.logging import MMLogger
            MMLogger.get_current_instance().warning(
                f'ImageNet-V2: no image in the folders {", ".join(empty)}')
        return samples
