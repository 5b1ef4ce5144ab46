"""Model-level throughput and memory of configs, side by side.

One measurement = one config (plus optional ``key=value`` overrides) in one
mode (``infer`` or ``train``) at one batch size and image size. Each runs in
a fresh process (see ``tools/analysis/benchmark.py``) so that peak memory is
that config's alone.

* ``infer``: ``model(inputs, mode='tensor')`` under ``torch.no_grad()`` in
  ``eval()`` mode: the network's forward pass.
* ``train``: one optimiser step. Classifiers run their real
  ``train_step`` (data preprocessor, loss with random labels, backward,
  AdamW step: torch's default implementation, or with ``optimizer=
  'adamw-fused'`` its fused kernel, ``AdamW(fused=True)``, for every
  model alike; the default one loops over the parameter tensors in Python,
  which weighs a model by its number of tensors as much as by its size).
  With ``amp`` (``'bf16'`` or ``'fp16'``) the step runs under
  ``torch.autocast``: on CUDA through mmengine's ``AmpOptimWrapper`` (loss
  scaling for float16), on the CPU in bfloat16 only.
  Detectors and segmentors run forward in ``mode='tensor'`` and
  back-propagate the sum of their outputs' means: the network's cost
  without target assignment, which depends on the annotations.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (weights,
optimiser state and activations); on the CPU the same quantity read from the
kernel: the resident-set high-water mark during the timed iterations
(``VmHWM``, reset after the warm-up) minus the resident set before the model
was built (so the interpreter and libraries do not count).
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from .memory import proc_status_kb, reset_peak_rss

__all__ = [
    'AMP_DTYPES', 'BenchmarkResult', 'OPTIMIZERS', 'parse_target',
    'resolve_config_path', 'run_benchmark'
]

#: optimiser of a training step -> keyword arguments of torch.optim.AdamW
OPTIMIZERS = {'adamw': {}, 'adamw-fused': {'fused': True}}
#: mixed-precision choice -> autocast dtype
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class BenchmarkResult:
    config: str
    mode: str
    batch: int
    img_size: int
    img_per_s: float
    ms_per_iter: float
    peak_mem_mb: float
    device: str
    threads: int
    #: the optimiser of a ``train`` measurement (see OPTIMIZERS)
    optimizer: Optional[str] = None
    #: autocast dtype (see AMP_DTYPES), None for float32
    amp: Optional[str] = None
    #: whether the backbone ran through torch.compile
    compiled: bool = False
    #: whether the BiFormer backbones went through
    #: :func:`mmbiformer.models.accelerate.accelerate`
    accelerated: bool = False
    #: torch.profiler table of one extra step (``profile_rows > 0``)
    profile: Optional[str] = None

    def as_dict(self) -> dict:
        out = asdict(self)
        if out['profile'] is None:
            del out['profile']
        return out


def parse_target(target: str):
    """Split ``CONFIG[@key=value,key=value]`` into path and overrides.

    Values are parsed as Python literals where possible
    (``model.backbone.attn_backend=official``, ``model.backbone.n_win=8``).
    """
    import ast
    path, _, rest = target.partition('@')
    overrides: Dict[str, object] = {}
    for item in filter(None, rest.split(',')):
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(
                f'override {item!r} in {target!r} is not key=value; write '
                'CONFIG@model.backbone.attn_backend=official')
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return path, overrides


def resolve_config_path(path: str) -> str:
    """Map ``mmpretrain::x/y.py`` (and mmdet::, mmseg::) to the file the
    toolbox's wheel ships; other paths are returned unchanged."""
    if '::' not in path:
        return path
    import importlib
    import os.path as osp
    package, _, rel = path.partition('::')
    root = osp.dirname(importlib.import_module(package).__file__)
    full = osp.join(root, '.mim', 'configs', rel)
    if not osp.isfile(full):
        raise FileNotFoundError(
            f'{path}: {package} ships no config {rel!r} (looked in '
            f'{osp.join(root, ".mim", "configs")})')
    return full


def cpu_model() -> str:
    """The CPU's model name and torch's capability level, e.g. ``'AMD EPYC
    (avx512)'``: every CPU figure should say which processor gave it."""
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    name = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    level = torch.backends.cpu.get_cpu_capability().lower()
    return f'{name} ({level})'


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu: {cpu_model()}'


def _rss_mb() -> float:
    rss = proc_status_kb('VmRSS')
    if rss is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return rss / 1024.0


def _peak_rss_mb() -> float:
    peak = proc_status_kb('VmHWM')
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return peak / 1024.0


def _build(path: str, overrides: dict):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import mmbiformer  # noqa: F401  (registers BiFormer)
    cfg = Config.fromfile(resolve_config_path(path))
    if overrides:
        cfg.merge_from_dict(overrides)
    scope = cfg.get('default_scope', 'mmpretrain')
    init_default_scope(scope)
    model_cfg = cfg.model
    # as mmengine's Runner does: the top-level preprocessor is the model's
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    # A benchmark measures the network, not a checkpoint on disk.
    model_cfg.get('backbone', {}).pop('init_cfg', None)
    if scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    elif scope == 'mmdet':
        from mmdet.registry import MODELS
    elif scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        raise ValueError(f'{path}: unknown default_scope {scope!r}')
    return scope, MODELS.build(model_cfg)


def _synthetic_batch(scope: str, batch: int, size: int, num_classes: int):
    inputs = [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        for _ in range(batch)
    ]
    if scope == 'mmpretrain':
        from mmpretrain.structures import DataSample
        samples = [
            DataSample().set_gt_label(int(torch.randint(num_classes, ())))
            for _ in range(batch)
        ]
        return dict(inputs=inputs, data_samples=samples)
    return dict(inputs=inputs)


def _num_classes(model) -> int:
    head = getattr(model, 'head', None)
    if head is not None and hasattr(head, 'num_classes'):
        return head.num_classes
    return 1000


def training_setup(target: str, batch: int, img_size: int):
    """``(scope, model, data, optim)`` for the training step of the
    one-process analysis tools (``ab_train_step.py``, ``train_phases.py``):
    the model of ``target`` (``config[@key=value,...]``) in train mode, a
    synthetic batch and torch's default AdamW, as :func:`run_benchmark`
    trains in float32 on the CPU."""
    from mmengine.optim import OptimWrapper
    scope, model = _build(*parse_target(target))
    model.train()
    data = _synthetic_batch(scope, batch, img_size, _num_classes(model))
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    return scope, model, data, optim


def run_benchmark(target: str,
                  mode: str = 'train',
                  batch: int = 8,
                  img_size: int = 224,
                  warmup: int = 2,
                  repeats: int = 5,
                  device: Optional[str] = None,
                  profile_rows: int = 0,
                  optimizer: str = 'adamw',
                  amp: Optional[str] = None,
                  compile: bool = False,
                  accelerate: bool = False) -> BenchmarkResult:
    """Measure one config in one mode; see the module docstring.

    With ``compile=True`` the backbone runs through ``torch.compile``
    (inductor, compiled during the warm-up iterations); with
    ``accelerate=True`` its BiFormer backbones (not other models) go
    through :func:`mmbiformer.models.accelerate.accelerate` first.

    With ``profile_rows > 0`` one more step runs under
    ``torch.profiler`` after the timed ones, and the result's ``profile``
    holds its ``profile_rows`` most expensive operators (self time).
    """
    if mode not in ('infer', 'train'):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f'optimizer={optimizer!r} is not one of '
                         f'{sorted(OPTIMIZERS)}')
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f'amp={amp!r} is not one of {sorted(AMP_DTYPES)} '
                         '(or None for float32)')
    dev = torch.device(device or ('cuda' if torch.cuda.is_available()
                                  else 'cpu'))
    if amp == 'fp16' and dev.type != 'cuda':
        raise ValueError("amp='fp16' needs CUDA (loss scaling); on the CPU "
                         "use amp='bf16' or float32 (amp=None)")
    path, overrides = parse_target(target)
    import mmbiformer  # noqa: F401  (imports torch and the toolboxes first)
    base_rss = _rss_mb()
    scope, model = _build(path, overrides)
    model = model.to(dev)
    if accelerate:
        from ..models.accelerate import accelerate as transform
        transform(model)
    if compile:
        model.backbone = torch.compile(model.backbone)
        warmup = max(warmup, 1)
    data = _synthetic_batch(scope, batch, img_size, _num_classes(model))

    autocast = (lambda: torch.autocast(dev.type, dtype=AMP_DTYPES[amp])
                ) if amp else contextlib.nullcontext
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), autocast():
                prepared = model.data_preprocessor(data, False)
                model(prepared['inputs'], mode='tensor')
    else:
        model.train()
        from mmengine.optim import AmpOptimWrapper, OptimWrapper
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                  **OPTIMIZERS[optimizer])
        if amp and dev.type == 'cuda':
            # what a config's AmpOptimWrapper does: autocast in
            # optim_context, a dynamic loss scale for float16
            optim = AmpOptimWrapper(
                optimizer=adamw, dtype=str(AMP_DTYPES[amp]).split('.')[-1],
                loss_scale='dynamic')
        elif amp:  # CPU bfloat16: autocast in optim_context, no scaling
            optim = _autocast_wrapper(OptimWrapper, adamw, autocast)
        else:
            optim = OptimWrapper(adamw)

        if scope == 'mmpretrain':

            def step():
                model.train_step(data, optim)
        else:

            def step():
                with optim.optim_context(model):
                    prepared = model.data_preprocessor(data, True)
                    outs = model(prepared['inputs'], mode='tensor')
                flat = []

                def collect(x):
                    if isinstance(x, torch.Tensor):
                        flat.append(x.float().mean())
                    elif isinstance(x, (list, tuple)):
                        for y in x:
                            collect(y)
                    elif isinstance(x, dict):
                        for y in x.values():
                            collect(y)

                collect(outs)
                optim.update_params(torch.stack(flat).sum())

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    reset_peak_rss()
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if dev.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _peak_rss_mb() - base_rss
    med = statistics.median(times)
    table = _profile(step, sync, dev, profile_rows) if profile_rows else None
    return BenchmarkResult(
        config=target,
        mode=mode,
        batch=batch,
        img_size=img_size,
        img_per_s=batch / med,
        ms_per_iter=med * 1e3,
        peak_mem_mb=peak,
        device=_device_name(dev),
        threads=torch.get_num_threads(),
        optimizer=optimizer if mode == 'train' else None,
        amp=amp,
        compiled=compile,
        accelerated=accelerate,
        profile=table)


def _autocast_wrapper(base: type, optimizer, autocast):
    """An instance of ``base`` (an mmengine optimiser wrapper) whose
    ``optim_context`` also enters ``autocast()``."""

    class _Autocast(base):

        @contextlib.contextmanager
        def optim_context(self, model):
            with super().optim_context(model), autocast():
                yield

    return _Autocast(optimizer)


def _profile(step, sync, dev: torch.device, rows: int) -> str:
    """Operator table (sorted by self time) of one ``step()``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    key = 'self_cpu_time_total'
    if dev.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
        key = 'self_cuda_time_total'
    with profile(activities=activities) as prof:
        step()
        sync()
    return prof.key_averages().table(sort_by=key, row_limit=rows,
                                     max_name_column_width=48)
