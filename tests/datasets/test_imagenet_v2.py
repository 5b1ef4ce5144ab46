"""ImageNet-V2: folder ``i`` holds class ``i`` (not the string order that
mmpretrain's CustomDataset uses)."""
import os.path as osp

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('mmpretrain')

import mmbiformer  # noqa: E402,F401  (registers ImageNetV2)
from mmbiformer.datasets.imagenet_v2 import ImageNetV2  # noqa: E402


def infos(data):
    return [data.get_data_info(i) for i in range(len(data))]


def make_v2(root, classes=(0, 1, 2, 10, 11, 100), per_class=2,
            folder='imagenetv2-matched-frequency-format-val'):
    base = root / folder
    for c in classes:
        (base / str(c)).mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(np.full((8, 8, 3), c % 255, np.uint8)).save(
                base / str(c) / f'{j:03d}.jpeg')
    return root


def test_labels_are_the_folder_numbers(tmp_path):
    from mmpretrain.datasets import CustomDataset
    root = make_v2(tmp_path)
    data = ImageNetV2(data_root=str(root))
    labels = {osp.basename(osp.dirname(d['img_path'])): d['gt_label']
              for d in infos(data)}
    assert labels == {str(c): c for c in (0, 1, 2, 10, 11, 100)}
    assert len(data) == 12 and len(data.CLASSES) == 1000
    # the stock dataset numbers the folders in string order: wrong labels
    stock = CustomDataset(data_root=str(root),
                          data_prefix='imagenetv2-matched-frequency-format-val')
    stock_labels = {osp.basename(osp.dirname(d['img_path'])): d['gt_label']
                    for d in infos(stock)}
    assert stock_labels == {'0': 0, '1': 1, '10': 2, '100': 3, '11': 4,
                            '2': 5}


def test_variants_and_errors(tmp_path):
    root = make_v2(tmp_path, classes=(5, 7),
                   folder='imagenetv2-top-images-format-val')
    data = ImageNetV2(data_root=str(root), variant='top-images')
    assert sorted({d['gt_label'] for d in infos(data)}) == [5, 7]
    with pytest.raises(FileNotFoundError, match='matched-frequency'):
        ImageNetV2(data_root=str(root))
    with pytest.raises(ValueError, match='Unknown ImageNet-V2 variant'):
        ImageNetV2(data_root=str(root), variant='v3')
    (root / 'imagenetv2-top-images-format-val' / 'n01440764').mkdir()
    with pytest.raises(ValueError, match='named by the class index'):
        ImageNetV2(data_root=str(root), variant='top-images')


def test_built_from_the_registry(tmp_path):
    from mmpretrain.registry import DATASETS
    root = make_v2(tmp_path, classes=(3, ))
    data = DATASETS.build(dict(type='ImageNetV2', data_root=str(root),
                               pipeline=[dict(type='LoadImageFromFile')]))
    assert data[0]['gt_label'] == 3 and data[0]['img'].shape == (8, 8, 3)
