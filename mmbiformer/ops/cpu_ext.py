"""The project's CPU kernels (``csrc/cpu_kernels.cpp``), built on first use.

:func:`load` compiles the C++ source with
``torch.utils.cpp_extension.load`` (about 30 s once; torch caches the build
and rebuilds it when the source changes) and returns the module, or ``None``
where it cannot be built or loaded (no compiler, no ninja, not Linux/x86-64)
or where ``MMBIFORMER_CPU_EXT=0`` is set. The operator then runs its
portable implementation: the kernels are an optimisation, never a
requirement. At a capability level below AVX-512 (a CPU without it, or
``ATEN_CPU_CAPABILITY=avx2``/``default``) the build pins that level's code.

``python -m mmbiformer.ops.cpu_ext`` builds it ahead of time (``make
install`` does this).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import platform
import threading
import warnings
from types import ModuleType
from typing import Optional

__all__ = ['available', 'build', 'capability', 'load']

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc',
                  'cpu_kernels.cpp')
ENV_SWITCH = 'MMBIFORMER_CPU_EXT'
#: per capability level below AVX-512: the build pins that level's code
_ISA_FLAGS = {
    'avx2': ['-DMMB_ISA=2', '-mavx2', '-mfma'],
    'default': ['-DMMB_ISA=1']
}

_lock = threading.Lock()
_state: dict = {}


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, '1') != '0'


def capability() -> str:
    """torch's CPU capability level in lower case (``'avx512'``,
    ``'avx2'``, ``'default'``, ...): the machine's, or the one
    ``ATEN_CPU_CAPABILITY`` forces, so one machine can run every level's
    code."""
    import torch
    return torch.backends.cpu.get_cpu_capability().lower()


def _builder():
    # importing torch's extension builder on a machine without CUDA logs a
    # warning about CUDA_HOME that does not concern a CPU-only build
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load as build
    finally:
        logger.setLevel(level)
    return build


def build(name: str, source: str = SOURCE,
          verbose: bool = False) -> ModuleType:
    """Build (or take from torch's cache) ``source`` as the module ``name``
    for the current capability level (:func:`capability`), with the flags
    the project's kernels are built with; raises where it cannot."""
    return _builder()(name=name, sources=[source],
                      extra_cflags=['-O3', '-fopenmp'] +
                      _ISA_FLAGS.get(capability(), []),
                      extra_ldflags=['-fopenmp'], verbose=verbose)


def load(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled module, or ``None`` (see the module docstring); the
    first failure is reported once as a warning with its cause."""
    if not _enabled():
        return None
    with _lock:
        if 'module' in _state:
            return _state['module']
        module = None
        level = capability()
        if platform.system() != 'Linux' or platform.machine() != 'x86_64':
            reason = f'{platform.system()}/{platform.machine()} is not ' \
                'Linux x86-64'
        else:
            try:
                suffix = '' if level not in _ISA_FLAGS else '_' + level
                module = build(name='mmbiformer_cpu_kernels' + suffix,
                               verbose=verbose)
                reason = None
            except Exception as err:  # compiler/ninja missing, build error
                reason = f'{type(err).__name__}: {err}'.strip()[-500:]
        if module is None:
            warnings.warn(
                f'mmbiformer CPU kernels unavailable ({reason}); using the '
                f'pure-torch paths (slower on the CPU). Set {ENV_SWITCH}=0 '
                'to skip the build.', RuntimeWarning, stacklevel=2)
        _state['module'] = module
        return module


def available() -> bool:
    """Whether :func:`load` returns a module (builds it if needed)."""
    return load() is not None


if __name__ == '__main__':
    mod = load(verbose=True)
    print('mmbiformer CPU kernels:', 'ready' if mod else 'unavailable')
    raise SystemExit(0 if mod else 1)
