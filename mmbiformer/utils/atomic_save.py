"""Crash-safe checkpoints for mmengine's runner.

mmengine writes a checkpoint straight to its final name, so a process killed
while saving leaves a truncated ``epoch_N.pth`` behind, and ``last_checkpoint``
(the file ``--resume`` reads) is rewritten in place. After
:func:`enable_atomic_checkpoint_saving`:

* a local checkpoint is written to a temporary file in the same folder,
  flushed to disk and renamed over the final name (``os.replace`` is atomic
  on POSIX and Windows), so a checkpoint file is either complete or absent;
* resuming looks for the newest complete checkpoint when ``last_checkpoint``
  is empty or names a file that does not exist.

Remote back ends (``s3://``, ``petrel://``, ...) keep mmengine's behaviour.
"""
from __future__ import annotations

import glob
import os
import os.path as osp
import re
from typing import Optional

import torch

__all__ = ['enable_atomic_checkpoint_saving', 'atomic_torch_save',
           'find_latest_checkpoint']

_ENABLED = False
_SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


def atomic_torch_save(obj, filename: str) -> None:
    """``torch.save(obj, filename)`` that never leaves a partial file."""
    folder = osp.dirname(osp.abspath(filename))
    os.makedirs(folder, exist_ok=True)
    tmp = osp.join(folder, f'.{osp.basename(filename)}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def find_latest_checkpoint(path: str) -> Optional[str]:
    """The checkpoint ``--resume`` continues from, in work dir ``path``.

    ``last_checkpoint`` when it names an existing file (or a remote one),
    else the most recently written ``*.pth`` of ``path``; ``None`` if none.
    """
    from mmengine.runner import checkpoint as ckpt_mod
    recorded = _ORIGINAL_FIND(path) if _ORIGINAL_FIND else None
    if recorded and (_SCHEME.match(recorded) or osp.isfile(recorded)):
        return recorded
    found = [
        f for f in glob.glob(osp.join(path, '*.pth'))
        if not osp.basename(f).startswith('.')
    ]
    if not found:
        return None
    latest = max(found, key=osp.getmtime)
    ckpt_mod.print_log(
        f'last_checkpoint in {path} is missing or names no file '
        f'({recorded!r}); resuming from the newest checkpoint, {latest}',
        logger='current')
    return latest


_ORIGINAL_SAVE = None
_ORIGINAL_FIND = None


def _save_checkpoint(checkpoint, filename, file_client_args=None,
                     backend_args=None):
    if _SCHEME.match(str(filename)):
        return _ORIGINAL_SAVE(checkpoint, filename, file_client_args,
                              backend_args)
    atomic_torch_save(checkpoint, str(filename))


def enable_atomic_checkpoint_saving() -> None:
    """Install the atomic writer and the robust resume lookup. Idempotent."""
    global _ENABLED, _ORIGINAL_SAVE, _ORIGINAL_FIND
    if _ENABLED:
        return
    import mmengine.runner as runner_pkg
    from mmengine.runner import _flexible_runner
    from mmengine.runner import checkpoint as ckpt_mod
    from mmengine.runner import runner as runner_mod
    _ORIGINAL_SAVE = ckpt_mod.save_checkpoint
    _ORIGINAL_FIND = ckpt_mod.find_latest_checkpoint
    # every module that bound the names at import time
    for mod in (ckpt_mod, runner_mod, runner_pkg, _flexible_runner):
        if hasattr(mod, 'save_checkpoint'):
            mod.save_checkpoint = _save_checkpoint
        if hasattr(mod, 'find_latest_checkpoint'):
            mod.find_latest_checkpoint = find_latest_checkpoint
    _ENABLED = True
