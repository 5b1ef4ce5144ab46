"""Safe checkpoint loading for mmengine on PyTorch >= 2.6.

Since PyTorch 2.6, ``torch.load`` defaults to ``weights_only=True``: it
unpickles tensors and plain containers only and refuses every other global.
mmengine 0.10 calls ``torch.load`` without the argument, and the checkpoints
its runner writes hold a few non-tensor objects, so ``--resume`` fails:

* the message hub stores :class:`mmengine.logging.HistoryBuffer` objects
  whose state is two numpy arrays (logged values and counts);
* runtime information may hold numpy scalars (for example a logged loss);
* mmengine's ``HistoryBuffer.__getstate__`` also stores the class-wide table
  of statistics methods, which pickles as ``getattr(HistoryBuffer, 'mean')``
  and would need ``builtins.getattr`` on the allow-list: a door to arbitrary
  code. The table is rebuilt from the class on loading anyway, so
  :func:`enable_safe_checkpoint_loading` makes history buffers pickle without
  it, and checkpoints then need no callable at all.

:func:`enable_safe_checkpoint_loading` adds exactly these types to torch's
allow-list. ``weights_only`` stays on, so a checkpoint that carries any other
pickled object (a function, a class with side effects) is still refused; the
error is re-raised as :class:`UnsafeCheckpointError`, naming the file and the
offending global.
"""
from __future__ import annotations

import pickle
import re
from typing import Any, List, Tuple, Union

import numpy as np
import torch

__all__ = [
    'UnsafeCheckpointError', 'checkpoint_safe_globals',
    'enable_safe_checkpoint_loading'
]

_ENABLED = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object outside the allow-list."""


def _numpy_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """Numpy objects needed to rebuild arrays, dtypes and scalars.

    Pickles written under numpy 1.x name ``numpy.core.multiarray``; numpy 2.x
    moved it to ``numpy._core.multiarray``. Both names are accepted so that
    checkpoints written by either load.
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    found: List[Union[Any, Tuple[Any, str]]] = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            found.append((fn, f'{module}.{fn.__name__}'))
    # The dtype classes of numeric and boolean data (numpy >= 1.25 pickles a
    # dtype by its class). Object, string and void dtypes stay excluded.
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        for name in ('BoolDType', 'Int8DType', 'Int16DType', 'Int32DType',
                     'Int64DType', 'UInt8DType', 'UInt16DType', 'UInt32DType',
                     'UInt64DType', 'Float16DType', 'Float32DType',
                     'Float64DType', 'LongLongDType', 'ULongLongDType',
                     'ByteDType', 'UByteDType', 'ShortDType', 'UShortDType',
                     'IntDType', 'UIntDType', 'LongDType', 'ULongDType'):
            cls = getattr(dtypes, name, None)
            if cls is not None and cls not in found:
                found.append(cls)
    return found


def checkpoint_safe_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """Return the objects that mmengine writes into checkpoints.

    Returns:
        list: entries for :func:`torch.serialization.add_safe_globals`.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer] + _numpy_globals()


def _load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local-file loader, with a clear error for unsafe files."""
    import os.path as osp
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location,
                          weights_only=True)
    except pickle.UnpicklingError as err:
        item = _refused_item(str(err))
        hint = ('If you trust the file, load it yourself and keep only its '
                'tensors.')
        if 'getattr' in item:
            hint = ('mmengine writes such references into history buffers '
                    'when mmbiformer is not imported: resave the checkpoint '
                    'from a process that imports mmbiformer, or keep only its '
                    '`state_dict`.')
        raise UnsafeCheckpointError(
            f'Refused to load checkpoint {filename!r}: it holds {item}, '
            'which is not on the allow-list of safe types (tensors, '
            'containers, numpy arrays and mmengine history buffers). '
            f'{hint} mmbiformer keeps `weights_only=True`.') from err


def _refused_item(message: str) -> str:
    """Name what torch's weights-only unpickler refused, from its error."""
    found = re.search(
        r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)', message)
    if found:
        return f'a pickled reference to `{found.group(1)}`'
    found = re.search(r'WeightsUnpickler error:\s*(.+)', message)
    if found:
        return f'pickle data it cannot read safely ({found.group(1).strip()})'
    return 'pickle data it cannot read safely'


def _history_buffer_getstate(self) -> dict:
    """State of a ``HistoryBuffer`` without the class-wide method table."""
    state = dict(self.__dict__)
    state.pop('statistics_methods', None)
    state.pop('_statistics_methods', None)
    return state


def enable_safe_checkpoint_loading() -> None:
    """Allow-list mmengine's checkpoint types for ``torch.load``.

    Idempotent. Also replaces mmengine's loader for local files so that it
    always passes ``weights_only=True`` explicitly and reports refused files
    clearly.
    """
    global _ENABLED
    if _ENABLED:
        return
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    from mmengine.logging.history_buffer import HistoryBuffer
    # mmengine's __setstate__ already restores the default methods when the
    # table is absent, so only the writing side changes.
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(
        prefixes='', loader=_load_local_checkpoint, force=True)
    _ENABLED = True
