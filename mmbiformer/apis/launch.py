"""Config handling and runner construction for ``tools/train.py`` and
``tools/test.py``."""
import copy
import os
import os.path as osp
import warnings
from typing import Optional, Sequence

import torch
from mmengine.config import Config, DictAction  # noqa: F401 (re-export)

KNOWN_SCOPES = ('mmpretrain', 'mmdet', 'mmseg')


def _say(msg: str) -> None:
    """Print a tool message once (rank 0 only under a launcher)."""
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'[mmbiformer] {msg}', flush=True)


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load ``path`` and merge ``--cfg-options``; check the scope."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in KNOWN_SCOPES:
        raise ValueError(
            f'{path}: default_scope is {scope!r}; the tools run configs of '
            f'{", ".join(KNOWN_SCOPES)} (inherit one of their bases)')
    return cfg


def setup_work_dir(cfg: Config, work_dir: Optional[str],
                   config_path: str) -> None:
    """``--work-dir`` > ``work_dir`` in the config > work_dirs/<config>."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config_path))[0])


def setup_resume(cfg: Config, resume: Optional[str]) -> None:
    """``--resume`` alone: the latest checkpoint of the work dir (if any);
    ``--resume PATH``: that checkpoint."""
    if resume is None:
        return
    cfg.resume = True
    if resume == 'auto':
        # mmengine looks up work_dir/last_checkpoint when load_from is None
        cfg.load_from = None
    else:
        cfg.load_from = resume


def _add_custom_hook(cfg: Config, hook_type: str) -> bool:
    """Append ``dict(type=hook_type)`` to ``custom_hooks`` unless the config
    has that hook (also as ``mmengine.<type>``); True if it was added."""
    hooks = list(cfg.get('custom_hooks') or [])
    if any(h.get('type') in (hook_type, f'mmengine.{hook_type}')
           for h in hooks):
        return False
    hooks.append(dict(type=hook_type))
    cfg.custom_hooks = hooks
    return True


def add_rng_state_hook(cfg: Config) -> None:
    """Add :class:`mmbiformer.engine.RNGStateHook` (generator states saved
    with each checkpoint and restored by ``--resume``) unless the config
    has it."""
    _add_custom_hook(cfg, 'RNGStateHook')


def _optim_wrapper_type(cfg: Config) -> Optional[str]:
    ow = cfg.get('optim_wrapper')
    if ow is None:
        return None
    t = ow.get('type', 'OptimWrapper')
    return t if isinstance(t, str) else getattr(t, '__name__', str(t))


def setup_amp(cfg: Config, amp: bool) -> None:
    """``--amp``: mixed precision with dynamic loss scaling (as in
    mmdet/mmseg). Without CUDA this is reported and ignored (see
    :func:`adapt_to_host`)."""
    if not amp:
        return
    if _optim_wrapper_type(cfg) == 'AmpOptimWrapper':
        _say('--amp: the config already trains with mixed precision')
        return
    if not torch.cuda.is_available():
        # adapt_to_host would turn it back into fp32 anyway
        _say('--amp ignored: mixed precision needs CUDA, which is not '
             'available here; training in fp32')
        return
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def _replace_norm(node, old: str, new: str) -> int:
    """Replace ``type=old`` by ``type=new`` in nested dicts/lists."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') == old:
            node['type'] = new
            count += 1
        for v in node.values():
            count += _replace_norm(v, old, new)
    elif isinstance(node, (list, tuple)):
        for v in node:
            count += _replace_norm(v, old, new)
    return count


def adapt_to_host(cfg: Config, launcher: str = 'none') -> Config:
    """Make a GPU recipe run on this machine, saying what changed.

    Without CUDA:

    * ``AmpOptimWrapper`` (mixed precision; mmengine asserts a CUDA device)
      becomes the fp32 ``OptimWrapper``, dropping the loss scale;
    * ``SyncBN`` becomes ``BN`` (torch's SyncBatchNorm only synchronises
      CUDA tensors; a single CPU process is unaffected, BN is what it
      computes anyway);
    * under a launcher the process group uses gloo instead of NCCL and the
      model is wrapped in DistributedDataParallel without device ids;
      :class:`~mmbiformer.engine.SyncNormStatsHook` averages the BatchNorm
      statistics over the ranks after every iteration (SyncBN's role), so
      that all ranks hold identical weights and buffers.
    """
    cfg.launcher = launcher
    if torch.cuda.is_available():
        return cfg
    if _optim_wrapper_type(cfg) == 'AmpOptimWrapper':
        ow = cfg.optim_wrapper
        scale = ow.get('loss_scale', 'dynamic')
        ow.type = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            ow.pop(key, None)
        msg = ('CUDA is not available: the config trains with mixed '
               f'precision (AmpOptimWrapper, loss_scale={scale}), which needs '
               'CUDA; training in fp32 with OptimWrapper instead')
        warnings.warn(msg, stacklevel=2)
        _say(msg)
    n = _replace_norm(cfg.get('model'), 'SyncBN', 'BN')
    if n:
        _say(f'CUDA is not available: {n} SyncBN norm config(s) replaced by '
             'BN (SyncBN synchronises CUDA tensors only)')
    if launcher != 'none':
        env_cfg = cfg.setdefault('env_cfg', {})
        dist_cfg = env_cfg.setdefault('dist_cfg', {})
        if dist_cfg.get('backend', 'nccl') != 'gloo':
            _say('CUDA is not available: distributed backend gloo (CPU '
                 'processes) instead of ' + dist_cfg.get('backend', 'nccl'))
        dist_cfg['backend'] = 'gloo'
        wrapper = cfg.get('model_wrapper_cfg') or {}
        wrapper = copy.deepcopy(dict(wrapper))
        wrapper.setdefault('type', 'MMDistributedDataParallel')
        # CPU module: DDP must get no device ids (mmengine passes LOCAL_RANK
        # unless the config names them)
        wrapper.setdefault('device_ids', None)
        wrapper.setdefault('broadcast_buffers', False)
        wrapper.setdefault('find_unused_parameters',
                           cfg.get('find_unused_parameters', False))
        cfg.model_wrapper_cfg = wrapper
        # BN (also where it replaced SyncBN) updates its running statistics
        # per rank: average them over the ranks after every iteration
        if _add_custom_hook(cfg, 'SyncNormStatsHook'):
            _say('CUDA is not available: BatchNorm running statistics are '
                 'averaged over the processes after every iteration '
                 '(SyncNormStatsHook) in place of SyncBN')
    return cfg


def _init_cpu_process_group(cfg: Config) -> None:
    """mmengine's pytorch launcher selects a CUDA device before creating the
    process group; without CUDA create the (gloo) group here instead. The
    runner then finds it initialised and uses it."""
    import torch.distributed as dist
    if cfg.launcher != 'pytorch' or torch.cuda.is_available() or \
            not dist.is_available() or dist.is_initialized():
        return
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get(
        'backend', 'gloo')
    dist.init_process_group(backend=backend)
    _say(f'process group: {dist.get_world_size()} processes, backend '
         f'{dist.get_backend()}')


def build_runner(cfg: Config):
    """Build the runner the config asks for (``runner_type``) or mmengine's
    ``Runner``; the registries of the config's toolbox are used through its
    ``default_scope``. ``compile`` (see :func:`compile_backbones`) is
    applied to the runner's model, and so is ``accelerate`` (see
    :func:`accelerate_backbones`)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    _init_cpu_process_group(cfg)
    compile_cfg = cfg.pop('compile', None)
    accelerate_cfg = cfg.pop('accelerate', 'auto')
    runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else
              RUNNERS.build(cfg))
    compiled = compile_backbones(runner.model, compile_cfg)
    accelerate_backbones(runner.model, accelerate_cfg, compiled=compiled > 0)
    return runner


def accelerate_backbones(model, accelerate_cfg='auto',
                         compiled: bool = False) -> bool:
    """``accelerate`` in a config: whether the BiFormer backbones go through
    :func:`mmbiformer.models.accelerate.accelerate` (in inference oneDNN
    products with the GELU as a post-op at AVX-512, the MLP in row blocks
    at AVX2; a one-pass weight gradient for the 5x5 depthwise convs in
    training; state dict unchanged).

    ``'auto'`` (the default) applies it where it was measured to pay
    (``docs/benchmarks.md``): eager runs on a CPU at the AVX-512 or AVX2
    level (``torch.backends.cpu.get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY`` can lower); not on GPUs, not at levels nobody
    measured and not with ``compile``. ``True`` and ``False`` force it.
    Returns whether it was applied."""
    if accelerate_cfg not in ('auto', True, False):
        raise ValueError("accelerate must be 'auto', True or False, got "
                         f'{accelerate_cfg!r}')
    if accelerate_cfg == 'auto':
        param = next(model.parameters(), None)
        accelerate_cfg = (not compiled and param is not None
                          and param.device.type == 'cpu'
                          and torch.backends.cpu.get_cpu_capability()
                          in ('AVX512', 'AVX2'))
    if not accelerate_cfg:
        return False
    from ..models.accelerate import accelerate
    counts = accelerate(model)
    if counts['backbones']:
        _say(f"accelerate: {counts['backbones']} BiFormer backbone(s), "
             f"{counts['modules']} modules swapped (accelerate=False keeps "
             'the plain modules)')
    return True


def compile_backbones(model, compile_cfg) -> int:
    """``compile=True`` (or a dict of ``torch.compile`` arguments) in a
    config: every BiFormer backbone's ``forward`` runs through
    ``torch.compile`` (``fullgraph=True`` unless the dict says otherwise:
    the backbone compiles whole). mmengine would compile the whole
    ``train_step`` instead, which with torch 2.14 fails inside dynamo on the
    toolboxes' optimiser parameter groups, and whose heads and target
    assignment break the graph in many places. The modules and their
    state dict stay as they are. Returns the number of backbones compiled.
    """
    import torch

    from ..models import BiFormer
    if compile_cfg is None or compile_cfg is False:
        return 0
    kwargs = dict(fullgraph=True)
    if isinstance(compile_cfg, dict):
        kwargs.update(compile_cfg)
    elif compile_cfg is not True:
        raise ValueError('compile must be True, False or a dict of '
                         f'torch.compile arguments, got {compile_cfg!r}')
    count = 0
    for module in model.modules():
        if isinstance(module, BiFormer):
            module.forward = torch.compile(module.forward, **kwargs)
            count += 1
    _say(f'compile: {count} BiFormer backbone(s) through torch.compile('
         f'{", ".join(f"{k}={v!r}" for k, v in kwargs.items())}); the first '
         'iterations compile')
    return count


def finish_distributed() -> None:
    """End a distributed run cleanly: wait for every rank, then destroy
    the process group.

    Without this, the gloo group's worker threads are still alive when the
    interpreter exits, and a rank can die with "terminate called without an
    active exception" (SIGABRT) after a successful run, which makes the
    launcher report the whole job as failed. Call it only after the work
    succeeded on this rank (a failing rank must not wait at a barrier).
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------- test
_VIS_HOOKS = {
    # hook type -> (switch key, where the painted images go)
    'DetVisualizationHook': 'draw',
    'SegVisualizationHook': 'draw',
    'VisualizationHook': 'enable',  # mmpretrain
}


def enable_visualization(cfg: Config, show_dir: Optional[str],
                         show: bool = False) -> None:
    """``--show-dir``/``--show``: paint predictions with the toolbox's
    visualization hook."""
    if show_dir is None and not show:
        return
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError('the config has no default_hooks.visualization; '
                         '--show-dir/--show need one')
    switch = _VIS_HOOKS.get(hook['type'])
    if switch is None:
        raise ValueError(f'unknown visualization hook {hook["type"]!r}')
    hook[switch] = True
    hook['show'] = show
    if show_dir is None:
        return
    scope = cfg.default_scope
    if scope == 'mmdet':
        # saved under <work_dir>/<timestamp>/<show_dir>, as mmdet does
        hook['test_out_dir'] = show_dir
    elif scope == 'mmseg':
        cfg.visualizer['save_dir'] = show_dir
    else:  # mmpretrain
        hook['out_dir'] = show_dir


def add_dump_metric(cfg: Config, out: str) -> None:
    """``--out``: also dump the raw predictions to a pickle file."""
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError('--out must be a .pkl or .pickle file')
    dump = dict(type='DumpResults', out_file_path=out)
    evaluator = cfg.test_evaluator
    if isinstance(evaluator, (list, tuple)):
        cfg.test_evaluator = list(evaluator) + [dump]
    elif 'metrics' in evaluator:
        metrics = evaluator['metrics']
        if not isinstance(metrics, (list, tuple)):
            metrics = [metrics]
        evaluator['metrics'] = list(metrics) + [dump]
    else:
        cfg.test_evaluator = [evaluator, dump]


def common_parser_args(parser, test: bool = False) -> None:
    """The flags mmdet/mmseg users know, shared by train and test."""
    parser.add_argument('--work-dir', help='directory for logs and '
                        'checkpoints (default: work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs (dotted keys, list '
        'indices allowed: train_dataloader.dataset.pipeline.2.scale=(64,64))')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (older: --local_rank)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def export_local_rank(args) -> None:
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)


def parse_kv(options: Optional[Sequence[str]]) -> dict:
    """``['a.b=1', ...]`` -> dict, parsed exactly like ``--cfg-options``."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument('--o', nargs='+', action=DictAction, default={})
    return p.parse_args(['--o', *options] if options else []).o
