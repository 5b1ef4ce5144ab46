"""The installed stack works: compiled mmcv ops, toolbox imports, and
mmengine checkpoints that load safely on torch >= 2.6."""
import os.path as osp
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import mmbiformer
from mmbiformer.utils.safe_load import (
    UnsafeCheckpointError,
    checkpoint_safe_globals,
)


def test_version():
    assert isinstance(mmbiformer.__version__, str)
    assert mmbiformer.__version__.count('.') == 2


def test_mmcv_compiled_ops_run_on_cpu():
    from mmcv.ops import RoIAlign, nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                          [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert dets.shape == (2, 5)

    feat = torch.arange(16.).view(1, 1, 4, 4)
    rois = torch.tensor([[0., 0., 0., 3., 3.]])
    out = RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=1,
                   aligned=False)(feat, rois)
    assert out.shape == (1, 1, 2, 2)
    # a 2x2 grid over [0, 3]^2 samples the centres of the four bins
    assert torch.allclose(out.flatten(),
                          torch.tensor([3.75, 5.25, 9.75, 11.25]))


def test_toolbox_model_packages_import():
    import mmdet.models  # noqa: F401
    import mmpretrain.models  # noqa: F401
    import mmseg.models  # noqa: F401


class _ToyModel(nn.Module):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels, mode='tensor'):
        pred = self.linear(inputs)
        if mode == 'loss':
            return dict(loss=((pred.squeeze(-1) - labels)**2).mean())
        return pred


class _ToyData(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]),
                    labels=torch.tensor(float(i % 2)))


def _runner(work_dir, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Wrapped(BaseModel):

        def __init__(self):
            super().__init__()
            self.toy = _ToyModel()

        def forward(self, inputs, labels, mode='tensor'):
            return self.toy(inputs, labels, mode)

    return Runner(
        model=Wrapped(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=_ToyData(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate'),
            batch_size=2),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1]),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        default_scope='mmengine',
        **kwargs)


def test_runner_checkpoint_resumes(tmp_path):
    runner = _runner(tmp_path / 'a')
    runner.train()
    ckpt = osp.join(tmp_path / 'a', 'epoch_2.pth')
    assert osp.isfile(ckpt)

    # the checkpoint really holds numpy objects and history buffers, i.e.
    # it is refused by a bare weights_only load without our allow-list ...
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        unsafe = set(
            torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    finally:
        torch.serialization.add_safe_globals(registered)
    assert any('HistoryBuffer' in name for name in unsafe)
    assert any(name.startswith('numpy') for name in unsafe)
    # ... and every such global is covered by exactly our allow-list
    allowed = set()
    for entry in checkpoint_safe_globals():
        if isinstance(entry, tuple):
            allowed.add(entry[1])
        else:
            allowed.add(f'{entry.__module__}.{entry.__qualname__}')
    assert unsafe <= allowed, unsafe - allowed

    # resuming through mmengine's own path works and restores the state
    resumed = _runner(tmp_path / 'a', resume=True, load_from=ckpt)
    resumed._train_loop = resumed.build_train_loop(resumed._train_loop)
    resumed.load_or_resume()
    assert resumed.epoch == 2
    assert resumed.iter == 8
    hub = resumed.message_hub
    assert 'train/loss' in hub.log_scalars
    saved = torch.load(ckpt, weights_only=True)
    for key, value in saved['state_dict'].items():
        assert torch.equal(resumed.model.state_dict()[key], value)


class _Payload:
    """Pickles into a call of ``open`` that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


class _System:
    """Pickles into a call of ``os.system``."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os
        return (os.system, (self.cmd, ))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    with open(evil, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Payload(str(marker))}, f)
    # plain pickle files fail torch's zip check; use torch.save's format too
    torch.save({'state_dict': {}, 'x': _Payload(str(marker))},
               tmp_path / 'evil_zip.pth')
    torch.save({'x': _System('true')}, tmp_path / 'evil_system.pth')
    expected = {evil: 'cannot read safely', tmp_path / 'evil_zip.pth': 'open',
                tmp_path / 'evil_system.pth': 'system'}
    for path, named in expected.items():
        with pytest.raises(UnsafeCheckpointError) as info:
            _load_checkpoint(str(path), map_location='cpu')
        assert str(path) in str(info.value)
        assert named in str(info.value)
        assert not marker.exists(), 'the pickled callable was executed'


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves no file under the final name, and an
    existing checkpoint of that name survives intact."""
    from mmengine.runner.checkpoint import save_checkpoint
    target = tmp_path / 'epoch_1.pth'
    save_checkpoint({'state_dict': {'w': torch.ones(3)}}, str(target))
    assert torch.load(target, weights_only=True)['state_dict']['w'].sum() == 3

    def crash(obj, f, *args, **kwargs):
        f.write(b'partial bytes')
        raise KeyboardInterrupt('killed while saving')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {'w': torch.zeros(3)}}, str(target))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {}}, str(tmp_path / 'epoch_2.pth'))
    monkeypatch.undo()
    assert not (tmp_path / 'epoch_2.pth').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_1.pth']
    assert torch.load(target, weights_only=True)['state_dict']['w'].sum() == 3


def test_resume_finds_checkpoint_when_last_checkpoint_is_broken(tmp_path):
    import os
    import time

    from mmengine.runner import find_latest_checkpoint
    for i in (1, 2):
        torch.save({'i': i}, tmp_path / f'epoch_{i}.pth')
        os.utime(tmp_path / f'epoch_{i}.pth', (time.time() + i, ) * 2)
    (tmp_path / 'last_checkpoint').write_text('')  # killed mid-write
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path /
                                                       'epoch_2.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path /
                                                       'epoch_1.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'gone.pth'))
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path /
                                                       'epoch_2.pth')
