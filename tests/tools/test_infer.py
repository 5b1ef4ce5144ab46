"""tools/infer.py: a picture per task from a tiny model; a clear error for
each kind of bad input."""
import os.path as osp

import pytest
import torch
from conftest import PYTHON, REPO, run
from mini_arch import MINI
from PIL import Image

from mmbiformer.apis.demo import demo_config, validation_image
from mmbiformer.apis.infer import (
    CheckpointMismatchError,
    InferenceInputError,
    check_checkpoint_fits,
    check_image,
    load_infer_config,
    prepare_checkpoint,
)
from mmbiformer.models import BiFormer
from mmbiformer.models.checkpoint import (
    ArchitectureMismatchError,
    check_architecture,
)

WIDTHS = list(MINI['embed_dims'])


def tiny_config(task, root, path, arch=MINI):
    """The demo config of ``task`` with the mini backbone, written to
    ``path``."""
    cfg = demo_config(task, root, repo=REPO)
    cfg.model.backbone.arch = dict(arch)
    if task == 'cls':
        cfg.model.head.in_channels = arch['embed_dims'][-1]
    else:
        cfg.model.neck.in_channels = list(arch['embed_dims'])
    cfg.dump(str(path))
    return cfg


def save_checkpoint(cfg, path):
    """Random weights of the config's model with the dataset's class names
    in the meta data, as tools/train.py saves them."""
    import importlib

    from mmengine.registry import init_default_scope

    import mmbiformer  # noqa: F401

    init_default_scope(cfg.default_scope)
    registry = importlib.import_module(f'{cfg.default_scope}.registry')
    torch.manual_seed(0)
    model = registry.MODELS.build(cfg.model)
    dataset = registry.DATASETS.get(cfg.test_dataloader.dataset.type)
    meta = dict(dataset.METAINFO)
    custom = cfg.test_dataloader.dataset.get('metainfo')
    if custom:
        # a subset of the classes with their own colours, as the datasets
        # report it (mmseg maps the labels and the palette to the subset)
        names = list(meta['classes'])
        if 'palette' in meta:
            meta['palette'] = [meta['palette'][names.index(c)]
                               for c in custom['classes']]
        meta.update(custom)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=meta)), str(path))
    return str(path)


@pytest.fixture(scope='module')
def tiny(demo_root, tmp_path_factory):
    """task -> (config path, checkpoint path) of tiny models."""
    tmp = tmp_path_factory.mktemp('tiny_models')
    out = {}
    for task in ('cls', 'det', 'seg'):
        cfg = tiny_config(task, demo_root, tmp / f'{task}.py')
        out[task] = (str(tmp / f'{task}.py'),
                     save_checkpoint(cfg, tmp / f'{task}.pth'))
    return out


@pytest.mark.parametrize('task', ['cls', 'det', 'seg'])
def test_infer_writes_a_picture(task, tiny, demo_root, tmp_path):
    config, ckpt = tiny[task]
    image = validation_image(demo_root, task)
    proc = run([PYTHON, 'tools/infer.py', image, config, ckpt, '--out-dir',
                str(tmp_path), '--device', 'cpu'], timeout=300)
    written = [ln.split('wrote ', 1)[1].strip()
               for ln in proc.stdout.splitlines() if '[infer] wrote ' in ln]
    assert len(written) == 1, proc.stdout[-3000:]
    out = written[0]
    assert out.startswith(str(tmp_path)) and osp.isfile(out)
    with Image.open(out) as drawn, Image.open(image) as src:
        assert drawn.size[0] >= src.size[0] and drawn.size[1] >= \
            src.size[1]
    if task == 'cls':
        # the top-5 classes are printed, with their names
        ranks = [ln for ln in proc.stdout.splitlines()
                 if ln.strip()[:2] in ('1.', '2.', '3.', '4.', '5.')]
        assert len(ranks) == 5, proc.stdout[-2000:]
        assert any(n in ranks[0] for n in ('disc', 'square', 'triangle',
                                           'cross', 'star', 'crescent'))


def test_infer_missing_image_cli(tiny, tmp_path):
    config, ckpt = tiny['cls']
    proc = run([PYTHON, 'tools/infer.py', str(tmp_path / 'nope.jpg'),
                config, ckpt], check=False, timeout=120)
    assert proc.returncode == 2
    assert 'error: Image' in proc.stdout and 'nope.jpg' in proc.stdout
    assert 'does not exist' in proc.stdout
    assert 'Traceback' not in proc.stdout


def test_infer_bad_inputs(tiny, demo_root, tmp_path):
    config, ckpt = tiny['cls']
    # not an image
    fake = tmp_path / 'notes.jpg'
    fake.write_text('this is text, not a picture')
    with pytest.raises(InferenceInputError, match='not an image'):
        check_image(str(fake))
    assert check_image(validation_image(demo_root, 'cls'))[0] > 0
    # missing config and checkpoint
    with pytest.raises(FileNotFoundError, match='Config'):
        load_infer_config(str(tmp_path / 'nope.py'))
    with pytest.raises(FileNotFoundError, match='Checkpoint'):
        prepare_checkpoint(str(tmp_path / 'nope.pth'), str(tmp_path))
    # a scope without an Inferencer
    other = tmp_path / 'other_scope.py'
    other.write_text("default_scope = 'mmocr'\nmodel = dict(type='X')\n")
    with pytest.raises(InferenceInputError,
                       match="'mmocr', which has no Inferencer"):
        load_infer_config(str(other))
    # not a BiFormer checkpoint
    plain = tmp_path / 'plain.pth'
    torch.save({'state_dict': {'fc.weight': torch.zeros(2, 2)}}, str(plain))
    with pytest.raises(CheckpointMismatchError, match='not a BiFormer'):
        prepare_checkpoint(str(plain), str(tmp_path))


def test_infer_checkpoint_of_another_architecture_cli(tiny, demo_root,
                                                      tmp_path):
    """A BiFormer checkpoint of other depths: exit 2, both named."""
    config, _ = tiny['cls']
    shallow = dict(MINI, depths=[1, 1, 1, 1])
    cfg = tiny_config('cls', demo_root, tmp_path / 'shallow.py', shallow)
    ckpt = save_checkpoint(cfg, tmp_path / 'shallow.pth')
    proc = run([PYTHON, 'tools/infer.py', validation_image(demo_root, 'cls'),
                config, ckpt, '--out-dir', str(tmp_path)], check=False,
               timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert 'holds a custom BiFormer (depths [1, 1, 1, 1]' in proc.stdout
    assert 'the model is a custom BiFormer (depths [1, 1, 2, 1]' in \
        proc.stdout
    assert not (tmp_path / 'vis').exists()


def test_architecture_names_tiny_and_small():
    tiny = BiFormer(arch='tiny').state_dict()
    small = BiFormer(arch='small').state_dict()
    with pytest.raises(ArchitectureMismatchError) as info:
        check_architecture(small, tiny, 'biformer_tiny.pth')
    msg = str(info.value)
    assert "'biformer_tiny.pth' holds BiFormer-T (tiny: depths [2, 2, 8, 2]" \
        in msg
    assert 'the model is BiFormer-S (small: depths [4, 4, 18, 4]' in msg
    assert 'strict=False' in msg
    check_architecture(tiny, tiny)  # the same: no error


def test_checkpoint_of_another_model(tiny):
    """A classifier's weights for a detector; a detector with another
    number of classes."""
    cls_state = torch.load(tiny['cls'][1])['state_dict']
    det_state = torch.load(tiny['det'][1])['state_dict']
    cls_as_det = {k: v for k, v in cls_state.items()
                  if k.startswith('backbone.')}
    with pytest.raises(CheckpointMismatchError, match='classifier'):
        check_checkpoint_fits(det_state, cls_as_det, 'c.pth', 'det.py')
    other = dict(det_state)
    w = other['roi_head.bbox_head.fc_cls.weight']
    other['roi_head.bbox_head.fc_cls.weight'] = w[:-1]  # a class fewer
    with pytest.raises(CheckpointMismatchError,
                       match='fc_cls.weight: checkpoint'):
        check_checkpoint_fits(det_state, other, 'd.pth', 'det.py')
    check_checkpoint_fits(det_state, det_state, 'd.pth', 'det.py')


def test_official_checkpoint_is_converted(tmp_path):
    """An official ImageNet file (``{'model': ...}``, ``norm.*``,
    ``head.*``) goes to the Inferencer in the OpenMMLab layout."""
    model = BiFormer(arch=MINI)
    official = {('norm.' + k[len('norm3.'):] if k.startswith('norm3.')
                 else k): v for k, v in model.state_dict().items()}
    official['head.weight'] = torch.zeros(1000, WIDTHS[-1])
    official['head.bias'] = torch.zeros(1000)
    src = tmp_path / 'biformer_mini_best.pth'
    torch.save({'model': official}, str(src))
    path, state, fmt = prepare_checkpoint(str(src), str(tmp_path))
    assert fmt == 'official_in1k' and path != str(src)
    assert 'head.fc.weight' in state and 'backbone.norm3.weight' in state
    assert torch.load(path)['state_dict'].keys() == state.keys()
