"""ImageNet-C (Hendrycks and Dietterich, ICLR 2019): the ImageNet validation
images under 15 benchmark corruptions (plus 4 extra ones) at 5 severities.

The release layout is ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` with
severities ``1`` to ``5``. :class:`ImageNetC` reads it (or a set made by
``tools/dataset_converters/make_imagenet_c.py`` from any image folder) and
tags every sample with its corruption and severity; the metric
:class:`mmbiformer.evaluation.ImageNetCMetric` turns the predictions into
errors per corruption and severity, corruption errors and the mCE.
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

from mmengine.dataset import BaseDataset
from mmengine.logging import MMLogger
from mmpretrain.datasets.custom import get_samples

__all__ = [
    'BENCHMARK_CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEVERITIES', 'ImageNetC'
]

#: the 15 corruptions of the benchmark (and of the mCE), by family: noise,
#: blur, weather, digital
BENCHMARK_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression')
#: the 4 extra corruptions of the release (held out: reported apart, not
#: part of the mCE)
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
SEVERITIES = (1, 2, 3, 4, 5)
_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


class ImageNetC(BaseDataset):
    """ImageNet-C as an mmpretrain classification dataset.

    Every sample has ``img_path``, ``gt_label``, ``corruption`` and
    ``severity``; keep the last two in the packed samples
    (``dict(type='PackInputs', meta_keys=(..., 'corruption',
    'severity'))``) for :class:`~mmbiformer.evaluation.ImageNetCMetric`.

    Args:
        data_root (str): The folder holding the corruption folders.
        corruptions (Sequence[str] | str): The corruptions to read:
            ``'benchmark'`` (the 15 of the mCE), ``'extra'`` (the 4 held-out
            ones), ``'all'`` (default, the 19 that are present; the
            benchmark ones must be) or a list of names.
        severities (Sequence[int]): Defaults to 1-5.
        classes (Sequence[str], optional): The class folder names (WordNet
            ids for ImageNet) in label order. Default: the sorted folder
            names of the first corruption and severity, which for ImageNet's
            1000 wnids is ImageNet's label order (as mmpretrain's
            ``ImageNet`` and ``CustomDataset`` number them). Every
            corruption and severity must have the same class folders.
        allow_missing (bool): A requested benchmark corruption or severity
            that is absent is an error (default); with True it is left out
            with a warning that names it, and the metric then reports no
            mCE over the 15 (see the metric).
        pipeline, test_mode, lazy_init, ...: as for mmengine's
            ``BaseDataset``.
    """

    METAINFO: dict = {}

    def __init__(self,
                 data_root: str,
                 corruptions='all',
                 severities: Sequence[int] = SEVERITIES,
                 classes: Optional[Sequence[str]] = None,
                 allow_missing: bool = False,
                 extensions: Sequence[str] = _EXTENSIONS,
                 **kwargs) -> None:
        self.requested = self._parse_corruptions(corruptions)
        self.severities = tuple(int(s) for s in severities)
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad:
            raise ValueError(f'ImageNet-C severities are 1-5, got {bad}')
        self.allow_missing = allow_missing
        self.extensions = tuple(e.lower() for e in extensions)
        self.wnids = list(classes) if classes is not None else None
        #: (corruption, severity) pairs requested but not on disk
        self.missing: List[str] = []
        kwargs.setdefault('test_mode', True)
        super().__init__(data_root=data_root, **kwargs)

    @staticmethod
    def _parse_corruptions(corruptions) -> Optional[tuple]:
        if corruptions == 'all':
            return None  # benchmark ones required, extras if present
        if corruptions == 'benchmark':
            return BENCHMARK_CORRUPTIONS
        if corruptions == 'extra':
            return EXTRA_CORRUPTIONS
        if isinstance(corruptions, str):
            corruptions = [corruptions]
        known = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
        unknown = [c for c in corruptions if c not in known]
        if unknown:
            raise ValueError(
                f'Unknown ImageNet-C corruptions {unknown}; the benchmark '
                f'ones are {list(BENCHMARK_CORRUPTIONS)}, the extra ones '
                f'{list(EXTRA_CORRUPTIONS)}')
        return tuple(corruptions)

    def _is_image(self, filename: str) -> bool:
        return filename.lower().endswith(self.extensions)

    def load_data_list(self) -> List[dict]:
        root = self.data_root
        if not osp.isdir(root):
            raise FileNotFoundError(
                f'ImageNet-C folder {root} not found (expected '
                '<root>/<corruption>/<severity 1-5>/<class>/*.JPEG)')
        if self.requested is None:
            present = set(os.listdir(root))
            wanted = BENCHMARK_CORRUPTIONS + tuple(
                c for c in EXTRA_CORRUPTIONS if c in present)
        else:
            wanted = self.requested
        pairs, missing = [], []
        for corruption in wanted:
            for severity in self.severities:
                folder = osp.join(root, corruption, str(severity))
                if osp.isdir(folder):
                    pairs.append((corruption, severity, folder))
                else:
                    missing.append(f'{corruption}/{severity}')
        self.missing = missing
        if missing:
            benchmark_missing = [
                m for m in missing
                if m.split('/')[0] in BENCHMARK_CORRUPTIONS]
            if benchmark_missing and not self.allow_missing:
                raise FileNotFoundError(
                    f'ImageNet-C under {root} lacks {len(missing)} '
                    f'corruption/severity folders: {missing[:10]}'
                    f'{" ..." if len(missing) > 10 else ""}. Extract the '
                    'whole release, or pass allow_missing=True (or '
                    'corruptions=[...], severities=[...]) to evaluate a part '
                    '(then no mCE over the 15 corruptions is reported).')
            MMLogger.get_current_instance().warning(
                f'ImageNet-C: left out (not found under {root}): '
                f'{", ".join(missing)}; the mCE over the 15 benchmark '
                'corruptions is not computed from a partial set.')
        if not pairs:
            raise FileNotFoundError(f'No ImageNet-C corruption folder found '
                                    f'under {root}')

        data_list = []
        for corruption, severity, folder in pairs:
            classes = sorted(d for d in os.listdir(folder)
                             if osp.isdir(osp.join(folder, d)))
            if self.wnids is None:
                self.wnids = classes
            index = {c: i for i, c in enumerate(self.wnids)}
            unknown = sorted(set(classes) - set(self.wnids))
            if unknown:
                raise ValueError(
                    f'{folder} has class folders {unknown[:5]} that are not '
                    f'among the {len(self.wnids)} classes of the dataset; '
                    'every corruption and severity holds the same classes')
            to_idx: Dict[str, int] = {c: index[c] for c in classes}
            samples, _ = get_samples(folder, to_idx,
                                     is_valid_file=self._is_image)
            for path, label in samples:
                data_list.append(
                    dict(img_path=osp.join(folder, path), gt_label=label,
                         corruption=corruption, severity=severity))
        self._metainfo['classes'] = tuple(self.wnids)
        return data_list
