"""ImageNet-C and ImageNet-V2 evaluations through tools/test.py with the
configs of configs/robustness/ (a mini model on tiny made-up data)."""
import json
import os.path as osp
import sys

import pytest
import torch

pytest.importorskip('mmpretrain')
pytest.importorskip('imagecorruptions')

from conftest import PYTHON, REPO, run  # noqa: E402

sys.path.insert(0, osp.join(REPO, 'tests'))
from mini_arch import MINI  # noqa: E402


def mini_config(tmp_path, name: str, data_root: str, extra: str = '') -> str:
    """The robustness config with the mini arch, 2 classes and 32 px."""
    path = tmp_path / f'{name}_mini.py'
    path.write_text(
        f"_base_ = ['{REPO}/configs/robustness/{name}_biformer_s.py']\n"
        f"model = dict(backbone=dict(arch=dict({MINI!r}, _delete_=True),\n"
        "                            auto_pad=True),\n"
        "             head=dict(num_classes=2, in_channels=256))\n"
        "data_preprocessor = dict(num_classes=2)\n"
        "test_dataloader = dict(batch_size=16, num_workers=0,\n"
        "    persistent_workers=False, dataset=dict(\n"
        f"    data_root='{data_root}', {extra}\n"
        "    pipeline=[dict(type='LoadImageFromFile'),\n"
        "              dict(type='ResizeEdge', scale=32, edge='short'),\n"
        "              dict(type='CenterCrop', crop_size=32),\n"
        "              dict(type='PackInputs', meta_keys=('sample_idx',\n"
        "                   'img_path', 'corruption', 'severity'))]))\n")
    return str(path)


def checkpoint(tmp_path, config: str) -> str:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    import mmbiformer  # noqa: F401
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    path = str(tmp_path / 'mini.pth')
    torch.save({'state_dict': model.state_dict()}, path)
    return path


def test_imagenet_c_through_tools_test(tmp_path):
    """make_imagenet_c.py writes the 15 corruptions at 5 severities from a
    class-folder set; tools/test.py evaluates it and reports the mCE."""
    import numpy as np
    from PIL import Image
    src = tmp_path / 'src'
    rng = np.random.default_rng(0)
    for cls in ('a', 'b'):
        (src / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(
            src / cls / 'x.png')
    dst = tmp_path / 'imagenet-c'
    out = run([PYTHON, 'tools/dataset_converters/make_imagenet_c.py',
               str(src), str(dst), '--size', '32', '--corruptions',
               'benchmark'], timeout=600)
    assert 'wrote 150 images' in out.stdout
    config = mini_config(tmp_path, 'imagenet-c', str(dst))
    ckpt = checkpoint(tmp_path, config)
    metrics = tmp_path / 'metrics.json'
    run([PYTHON, 'tools/test.py', config, ckpt, '--work-dir',
         str(tmp_path / 'work'), '--metrics-out', str(metrics)],
        timeout=900)
    result = json.loads(metrics.read_text())
    assert 0 <= result['imagenet-c/mean_error'] <= 100
    ce = [result[f'imagenet-c/CE/{c}'] for c in
          ('gaussian_noise', 'jpeg_compression')]
    assert all(v >= 0 for v in ce)
    assert 'imagenet-c/mCE' in result
