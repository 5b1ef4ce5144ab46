"""Issue #7, bad input, checkpoints: missing/unexpected keys are reported
by name; truncated, empty or garbage files give an error naming the file;
a file carrying pickled code is refused (and the code does not run)."""
import logging
import os.path as osp

import pytest
import torch
from mmengine.logging import MMLogger

from mmbiformer.models import BiFormer
from mmbiformer.models.checkpoint import (
    ArchitectureMismatchError,
    CorruptCheckpointError,
)
from mmbiformer.utils import UnsafeCheckpointError

from .conftest import MINI, make_mini


def _pretrained(path, **kwargs):
    model = make_mini(init_cfg=dict(type='Pretrained', checkpoint=path),
                      **kwargs)
    model.init_weights()
    return model


@pytest.fixture
def ckpt_file(tmp_path, mini_state):
    path = str(tmp_path / 'detector.pth')
    torch.save(
        {
            'state_dict': {'backbone.' + k: v
                           for k, v in mini_state.items()},
            'meta': dict(epoch=3)
        }, path)
    return path


class _Capture(logging.Handler):

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_bad_input_checkpoint_good_file_loads(ckpt_file, mini_state):
    model = _pretrained(ckpt_file)
    report = model.checkpoint_report
    assert report['missing'] == [] and report['unexpected'] == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, mini_state[k], rtol=0, atol=0)


def test_bad_input_checkpoint_missing_and_unexpected_keys_are_named(
        tmp_path, mini_state):
    state = {'backbone.' + k: v for k, v in mini_state.items()}
    state.pop('backbone.stages.2.1.attn.wo.weight')
    state['backbone.stages.2.1.attn.extra.weight'] = torch.zeros(3)
    # bad shape (not norm1: its width names the architecture)
    state['backbone.stages.0.0.norm2.weight'] = torch.zeros(7)
    path = str(tmp_path / 'partial.pth')
    torch.save({'state_dict': state}, path)

    logger = MMLogger.get_current_instance()
    capture = _Capture()
    logger.addHandler(capture)
    try:
        model = _pretrained(path)
    finally:
        logger.removeHandler(capture)
    report = model.checkpoint_report
    assert report['missing'] == ['stages.2.1.attn.wo.weight']
    assert report['unexpected'] == ['stages.2.1.attn.extra.weight']
    assert report['shape_mismatch'] == [
        'stages.0.0.norm2.weight: checkpoint (7,) vs model (32,)'
    ]
    log = '\n'.join(capture.messages)
    assert "missing keys: ['stages.2.1.attn.wo.weight']" in log
    assert "unexpected keys: ['stages.2.1.attn.extra.weight']" in log
    assert 'stages.0.0.norm2.weight: checkpoint (7,)' in log
    assert path in log


def test_bad_input_checkpoint_truncated_file(tmp_path, ckpt_file):
    data = open(ckpt_file, 'rb').read()
    path = str(tmp_path / 'truncated.pth')
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        _pretrained(path)
    assert path in str(info.value)
    assert 'truncated' in str(info.value)
    assert isinstance(info.value, RuntimeError)  # what torch raised before


@pytest.mark.parametrize('content, reason', [
    (b'', 'the file is empty'),
    (bytes(range(7, 250)) * 9, 'not a PyTorch checkpoint'),
    (b'<html>404 Not Found</html>', 'not a PyTorch checkpoint'),
])
def test_bad_input_checkpoint_garbage_file(tmp_path, content, reason):
    path = str(tmp_path / 'garbage.pth')
    with open(path, 'wb') as f:
        f.write(content)
    with pytest.raises(CorruptCheckpointError, match=reason) as info:
        _pretrained(path)
    assert path in str(info.value)


def test_bad_input_checkpoint_missing_file(tmp_path):
    path = str(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        _pretrained(path)


def test_bad_input_checkpoint_without_backbone_keys_names_the_file(tmp_path):
    path = str(tmp_path / 'head_only.pth')
    torch.save({'state_dict': {'head.fc.weight': torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError,
                       match='head_only.pth.*No BiFormer backbone keys'):
        _pretrained(path)
    path = str(tmp_path / 'list.pth')
    torch.save([1, 2, 3], path)
    with pytest.raises(TypeError, match='list.pth.*Expected a checkpoint'):
        _pretrained(path)


class _Payload:
    """Pickles as a call of ``open(marker, 'w')``: loading the file with
    pickle would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_bad_input_checkpoint_with_pickled_code_is_refused(
        tmp_path, mini_state):
    marker = str(tmp_path / 'code_ran')
    path = str(tmp_path / 'evil.pth')
    torch.save(
        {
            'state_dict': {'backbone.' + k: v
                           for k, v in mini_state.items()},
            'meta': dict(hook=_Payload(marker))
        }, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        _pretrained(path)
    assert path in str(info.value)
    assert 'allow-list' in str(info.value)
    assert not osp.exists(marker)
    assert not isinstance(info.value, CorruptCheckpointError)


def test_bad_input_checkpoint_of_another_arch_reports_shape_mismatches(
        tmp_path, mini_state):
    """A checkpoint of another width is an error naming both
    architectures; with ``strict=False`` (a partial load) every
    mismatching tensor is listed."""
    path = str(tmp_path / 'other.pth')
    torch.save({'state_dict': {'backbone.' + k: v
                               for k, v in mini_state.items()}}, path)
    wider = dict(MINI, embed_dims=[64, 64, 128, 256])
    model = BiFormer(arch=wider, out_indices=(0, 1, 2, 3),
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(ArchitectureMismatchError,
                       match=r'other.pth.*embed_dims \[32, 64, 128, 256\]'
                       r'.*embed_dims \[64, 64, 128, 256\]'):
        model.init_weights()
    model = BiFormer(arch=wider, out_indices=(0, 1, 2, 3),
                     init_cfg=dict(type='Pretrained', checkpoint=path,
                                   strict=False))
    model.init_weights()
    mismatched = model.checkpoint_report['shape_mismatch']
    assert any(m.startswith('stages.0.0.norm1.weight') for m in mismatched)
    assert any(m.startswith('downsample_layers.0.3.weight')
               for m in mismatched)
