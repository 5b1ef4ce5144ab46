"""Several models measured in one process, interleaved (GPU comparisons).

:func:`run_interleaved` builds every case first, warms each up (compiling
where asked), then times them round by round: case 1, case 2, ..., case 1
again, so a clock or thermal drift of the device reaches every case alike.
Each case then runs one profiled step (:mod:`.profiling`): kernels per
step and the fraction of the step the device was busy.

Cases (:class:`Case`): a config, ``infer`` or ``train``, a batch, and a
compile mode (``None`` for eager, else a ``torch.compile`` mode such as
``'default'``, ``'reduce-overhead'`` (CUDA graphs) or ``'max-autotune'``).

Classification steps run on synthetic, already normalised images (the
data preprocessor runs once, outside the timing), the same for every
model:

* ``infer``: ``head(extract_feat(x))`` under ``no_grad``;
* ``train``: cross-entropy of ``head(extract_feat(x))`` on random labels,
  backward, and an AdamW step (``fused`` by default). The forward and loss
  are one function; a compiled case compiles that function (with the
  backward), which is what CUDA graphs need.

Detection (``mmdet`` configs, mode ``train``): mmdet's own ``train_step``
on synthetic images with random boxes and masks (RPN, RoI and mask losses,
target assignment included); a compiled case compiles the backbone, as
``compile=True`` in a config does here.

Compiled cases report the graphs dynamo compiled while warming up
(``graphs_compiled``) and any compiled while timed
(``recompiles_while_timed``, which should stay 0).

Peak memory of a case: the peak allocated during its timed steps, less
what the other cases hold at rest, plus what it holds at rest itself
(weights, gradients, optimiser state, compiled graphs' buffers), so that
it reads as if the case ran alone.
"""
from __future__ import annotations

import datetime
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .benchmark import (
    AMP_DTYPES,
    OPTIMIZERS,
    _build,
    _device_name,
    _num_classes,
    parse_target,
)
from .profiling import profile_step

__all__ = ['Case', 'device_info', 'run_interleaved']


@dataclass
class Case:
    target: str
    mode: str = 'train'
    batch: int = 64
    compile_mode: Optional[str] = None
    #: detection: image size (h, w); classification: square side
    img_size: tuple = (224, 224)
    #: a short name for the records (default: the config's file name)
    name: Optional[str] = None
    #: BiFormer backbones through :func:`mmbiformer.models.accelerate.
    #: accelerate` (other models stay as built)
    accelerate: bool = False

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        path = parse_target(self.target)[0]
        return path.rsplit('/', 1)[-1].rsplit('::', 1)[-1].replace('.py', '')


def device_info(dev: torch.device) -> dict:
    """Device, driver, torch and Triton versions and the date, for every
    record."""
    info = dict(device=_device_name(dev), torch=torch.__version__,
                date=datetime.date.today().isoformat(), driver=None,
                cuda=torch.version.cuda, triton=None)
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError:
        pass
    if dev.type == 'cuda':
        try:
            out = subprocess.run(
                ['nvidia-smi', '--query-gpu=driver_version',
                 '--format=csv,noheader'], capture_output=True, text=True,
                timeout=30)
            info['driver'] = out.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return info


class _Prepared:
    """One case, built and ready: ``step()`` runs one iteration."""

    def __init__(self, case: Case, step: Callable[[], None], held):
        self.case = case
        self.step = step
        self.held = held  # keeps model, optimiser and inputs alive
        self.resident_mb = 0.0


#: torch.compile modes that capture CUDA graphs
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')


def _mark_step(compile_mode: Optional[str]) -> None:
    """A new iteration for CUDA graph trees (outputs of the last one may be
    overwritten)."""
    if compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def _built(case: Case):
    scope, model = _build(*parse_target(case.target))
    if case.accelerate:
        from ..models.accelerate import accelerate
        accelerate(model)
    return scope, model


def _classifier(case: Case, dev, amp, optimizer, held):
    scope, model = _built(case)
    model = model.to(dev)
    size = case.img_size[0] if isinstance(case.img_size, tuple) \
        else case.img_size
    g = torch.Generator().manual_seed(0)
    raw = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                         generator=g) for _ in range(case.batch)]
    with torch.no_grad():
        x = model.data_preprocessor(dict(inputs=raw), False)['inputs']
    y = torch.randint(0, _num_classes(model), (case.batch,), generator=g)
    x, y = x.to(dev), y.to(dev)
    autocast = torch.autocast(dev.type, dtype=AMP_DTYPES.get(amp),
                              enabled=amp is not None)

    def logits(inp):
        return model.head(model.extract_feat(inp))

    def loss_fn(inp, target):
        return F.cross_entropy(logits(inp).float(), target)

    fn = logits if case.mode == 'infer' else loss_fn
    if case.compile_mode:
        fn = torch.compile(fn, mode=case.compile_mode)
    held.extend([model, x, y])
    if case.mode == 'infer':
        model.eval()

        def step():
            _mark_step(case.compile_mode)
            with torch.no_grad(), autocast:
                fn(x)
        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4,
                            **OPTIMIZERS[optimizer])
    held.append(opt)

    def step():
        _mark_step(case.compile_mode)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = fn(x, y)
        loss.backward()
        opt.step()
    return step


def synthetic_detection_batch(n: int, hw, num_classes: int = 80,
                              boxes: int = 8, seed: int = 0) -> dict:
    """``n`` random uint8 images of ``hw`` with ``boxes`` random boxes and
    their rectangle masks each, as mmdet's data pipeline packs them."""
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8,
                                    generator=g))
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = (torch.rand(boxes, 2, generator=g) * 0.25 + 0.05) * \
            torch.tensor([w, h])
        bb = torch.cat([xy, xy + wh], 1)
        masks = np.zeros((boxes, h, w), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(bb.round().int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        inst = InstanceData(
            bboxes=bb, labels=torch.randint(0, num_classes, (boxes,),
                                            generator=g),
            masks=BitmapMasks(masks, h, w))
        sample = DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
            scale_factor=(1.0, 1.0)))
        sample.gt_instances = inst
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _detector(case: Case, dev, amp, optimizer, held):
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    if case.mode != 'train':
        raise ValueError('detection cases measure the training step only')
    scope, model = _built(case)
    if scope != 'mmdet':
        raise ValueError(f'{case.target}: not an mmdet config')
    model = model.to(dev).train()
    if case.compile_mode:
        model.backbone = torch.compile(model.backbone,
                                       mode=case.compile_mode)
    head = getattr(model, 'roi_head', None)
    classes = getattr(getattr(head, 'bbox_head', None), 'num_classes', 80)
    data = synthetic_detection_batch(case.batch, case.img_size, classes)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4,
                              **OPTIMIZERS[optimizer])
    if amp and dev.type == 'cuda':
        optim = AmpOptimWrapper(optimizer=adamw,
                                dtype=str(AMP_DTYPES[amp]).split('.')[-1])
    else:
        optim = OptimWrapper(adamw)
    held.extend([model, data, optim])

    def step():
        model.train_step(data, optim)
    return step


def _is_detection(target: str) -> bool:
    from mmengine.config import Config

    from .benchmark import resolve_config_path
    cfg = Config.fromfile(resolve_config_path(parse_target(target)[0]))
    return cfg.get('default_scope', 'mmpretrain') == 'mmdet'


def run_interleaved(cases: List[Case], device: Optional[str] = None,
                    amp: Optional[str] = 'bf16',
                    optimizer: str = 'adamw-fused', warmup: int = 3,
                    repeats: int = 10, rounds: int = 2,
                    profile: bool = True,
                    log: Callable[[str], None] = print) -> List[dict]:
    """Measure every case in this process, interleaved; one record per
    case (see the module docstring), fastest round kept."""
    dev = torch.device(device or ('cuda' if torch.cuda.is_available()
                                  else 'cpu'))
    if amp == 'fp16' and dev.type != 'cuda':
        raise ValueError("amp='fp16' needs CUDA")
    import mmbiformer  # noqa: F401  (registers BiFormer)
    cuda = dev.type == 'cuda'

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def allocated() -> float:
        return torch.cuda.memory_allocated(dev) / 2**20 if cuda else 0.0

    from torch._dynamo.utils import counters

    def graphs() -> int:
        return counters['stats']['unique_graphs']

    prepared: List[_Prepared] = []
    for case in cases:
        before, graphs_before = allocated(), graphs()
        held: list = []
        make = _detector if _is_detection(case.target) else _classifier
        start = time.perf_counter()
        step = make(case, dev, amp, optimizer, held)
        for _ in range(max(warmup, 1)):
            step()
        sync()
        p = _Prepared(case, step, held)
        p.resident_mb = allocated() - before
        p.setup_s = time.perf_counter() - start
        p.graphs = graphs() - graphs_before
        prepared.append(p)
        log(f'[ready] {case.label} {case.mode} b{case.batch} '
            f'{case.compile_mode or "eager"}: {p.setup_s:.0f} s to build '
            f'and warm up')
    best = {}
    for rnd in range(rounds):
        for i, p in enumerate(prepared):
            resident_all = allocated()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            times, graphs_before = [], graphs()
            for _ in range(repeats):
                t0 = time.perf_counter()
                p.step()
                sync()
                times.append(time.perf_counter() - t0)
            peak = None
            if cuda:
                peak = (torch.cuda.max_memory_allocated(dev) / 2**20 -
                        resident_all + p.resident_mb)
            med = statistics.median(times)
            p.recompiles = getattr(p, 'recompiles', 0) + graphs() - \
                graphs_before
            if i not in best or med < best[i][0]:
                best[i] = (med, peak)
            log(f'[round {rnd + 1}/{rounds}] {p.case.label} {p.case.mode} '
                f'b{p.case.batch} {p.case.compile_mode or "eager"}: '
                f'{p.case.batch / med:.1f} img/s')
    info = device_info(dev)
    records = []
    for i, p in enumerate(prepared):
        med, peak = best[i]
        c = p.case
        rec = dict(model=c.label, config=c.target, mode=c.mode,
                   compiled=c.compile_mode is not None,
                   compile_mode=c.compile_mode, batch=c.batch,
                   img_size=list(c.img_size) if isinstance(
                       c.img_size, tuple) else [c.img_size] * 2,
                   img_s=c.batch / med, ms_per_step=med * 1e3,
                   peak_mb=peak, amp=amp,
                   optimizer=optimizer if c.mode == 'train' else None,
                   accelerated=c.accelerate,
                   setup_s=p.setup_s, rounds=rounds, repeats=repeats,
                   graphs_compiled=p.graphs,
                   recompiles_while_timed=p.recompiles,
                   **info)
        if profile:
            prof = profile_step(p.step, sync, 'cuda' if cuda else 'cpu')
            rec.update(kernels_per_step=prof['kernels'],
                       copies_per_step=prof['copies'],
                       busy_fraction=prof['busy_fraction'],
                       busy_ms=prof['busy_ms'],
                       profiled_step_ms=prof['wall_ms'],
                       top_kernels=prof['top'])
        records.append(rec)
    return records
