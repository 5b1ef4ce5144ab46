"""The project's CPU kernels (``csrc/cpu_kernels.cpp``), built on first use.

:func:`load` compiles the C++ source with
``torch.utils.cpp_extension.load`` (about 30 s once; torch caches the build
and rebuilds it when the source changes) and returns the module, or ``None``
where it cannot be built or loaded (no compiler, no ninja, not Linux/x86-64)
or where ``MMBIFORMER_CPU_EXT=0`` is set. Callers then use their pure-torch
paths: the kernels are an optimisation, never a requirement.

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

__all__ = ['available', 'capturing_graph', 'eager_cpu_float32', 'load']

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc',
                  'cpu_kernels.cpp')
ENV_SWITCH = 'MMBIFORMER_CPU_EXT'

_lock = threading.Lock()
_state: dict = {}


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, '1') != '0'


def capturing_graph() -> bool:
    """Whether a JIT trace/script, ``torch.compile`` or ``torch.export`` is
    recording the model: the callers then keep their torch-only paths, so
    FLOP counters, ONNX and torch.export see the ops they know."""
    import torch
    return (torch.jit.is_scripting() or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def eager_cpu_float32(*tensors) -> bool:
    """Whether the project's CPU float32 fast paths may take these tensors:
    all float32 on the CPU, no CPU autocast, no graph being recorded
    (:func:`capturing_graph`). Each caller adds its own shape and
    gradient conditions."""
    import torch
    return (all(t.device.type == 'cpu' and t.dtype == torch.float32
                for t in tensors)
            and not torch.is_autocast_enabled('cpu')
            and not capturing_graph())


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


def load(verbose: bool = False) -> Optional[ModuleType]:
    """The compiled module, or ``None`` (see the module docstring); the
    first failure is reported once as a warning with its cause."""
    if not _enabled():
        return None
    with _lock:
        if 'module' in _state:
            return _state['module']
        module = None
        if platform.system() != 'Linux' or platform.machine() != 'x86_64':
            reason = f'{platform.system()}/{platform.machine()} is not ' \
                'Linux x86-64'
        else:
            try:
                build = _builder()
                module = build(
                    name='mmbiformer_cpu_kernels',
                    sources=[SOURCE],
                    extra_cflags=['-O3', '-fopenmp'],
                    extra_ldflags=['-fopenmp'],
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
