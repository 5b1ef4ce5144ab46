"""The ImageNet-C dataset over ``<corruption>/<severity>/<class>/``."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip('mmpretrain')

import mmbiformer  # noqa: E402,F401  (registers ImageNetC)
from mmbiformer.datasets.imagenet_c import (  # noqa: E402
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    ImageNetC,
)


def make_c(root, corruptions=BENCHMARK_CORRUPTIONS, severities=range(1, 6),
           classes=('n02', 'n01'), skip=()):
    for c in corruptions:
        for s in severities:
            if (c, s) in skip:
                continue
            for cls in classes:
                folder = root / c / str(s) / cls
                folder.mkdir(parents=True)
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
                    folder / 'a.JPEG')
    return root


def infos(data):
    return [data.get_data_info(i) for i in range(len(data))]


def test_samples_carry_corruption_severity_and_label(tmp_path):
    root = make_c(tmp_path, corruptions=BENCHMARK_CORRUPTIONS + ('spatter',))
    data = ImageNetC(data_root=str(root))
    items = infos(data)
    assert len(items) == (15 + 1) * 5 * 2
    assert data.metainfo['classes'] == ('n01', 'n02')  # sorted wnids
    first = items[0]
    assert first['corruption'] == 'gaussian_noise' and first['severity'] == 1
    assert {(i['img_path'].split('/')[-2], i['gt_label']) for i in items} == \
        {('n01', 0), ('n02', 1)}
    assert {i['corruption'] for i in items} == \
        set(BENCHMARK_CORRUPTIONS) | {'spatter'}
    extra = ImageNetC(data_root=str(root), corruptions='extra',
                      allow_missing=True)
    assert {i['corruption'] for i in infos(extra)} == {'spatter'}
    assert len(extra.missing) == 3 * 5  # the other extras, named
    assert 'saturate/1' in extra.missing
    assert set(EXTRA_CORRUPTIONS) > {'spatter'}


def test_missing_benchmark_folders_are_an_error_or_a_named_warning(tmp_path):
    root = make_c(tmp_path, skip={('fog', 2)})
    with pytest.raises(FileNotFoundError, match='fog/2'):
        ImageNetC(data_root=str(root))
    data = ImageNetC(data_root=str(root), allow_missing=True)
    assert data.missing == ['fog/2']
    assert len(data) == (15 * 5 - 1) * 2
    with pytest.raises(ValueError, match='Unknown ImageNet-C corruptions'):
        ImageNetC(data_root=str(root), corruptions=['rain'])
    with pytest.raises(ValueError, match='severities are 1-5'):
        ImageNetC(data_root=str(root), severities=[0])


def test_different_classes_per_folder_are_an_error(tmp_path):
    root = make_c(tmp_path, corruptions=('snow', ), severities=(1, 2))
    (root / 'snow' / '2' / 'n99').mkdir()
    with pytest.raises(ValueError, match='n99'):
        ImageNetC(data_root=str(root), corruptions=['snow'],
                  severities=(1, 2))
