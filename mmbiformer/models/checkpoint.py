"""Official BiFormer checkpoints: format detection and key mapping.

Three layouts are understood:

``official_in1k``
    The authors' ImageNet checkpoints: ``{'model': state_dict}`` with keys
    such as ``downsample_layers.0.0.weight``,
    ``stages.2.5.attn.qkv.qkv.weight``,
    ``norm.*`` (the BatchNorm after the last stage) and ``head.*``. Those
    of the ablation models BiFormer-STL and -STL-nchw name blocks
    ``stages.{i}.blocks.{j}`` and their MLPs ``mlp.0`` / ``mlp.2``; in
    STL-nchw the projections are 1x1 convs (``attn.qkv_linear``,
    ``attn.output_linear``, the MLP, the last stage's ``attn.qkv`` and
    ``attn.proj``). They map to ``stages.{i}.{j}``, ``mlp.0`` / ``mlp.3``,
    ``attn.qkv.qkv``, ``attn.wo`` and linear weights (the same numbers,
    ``(out, in, 1, 1)`` -> ``(out, in)``).
``official_dense``
    The authors' mmdet/mmseg checkpoints: ``{'state_dict': ...}`` with the
    backbone under ``backbone.`` and a LayerNorm2d per output stored as
    ``backbone.extra_norms.{i}``.
``mm``
    This project's layout (what :func:`convert_official_checkpoint` writes):
    the backbone keys are the official ones except the output norms, which
    are ``norm{i}`` (``norm.*`` -> ``norm3.*``, ``extra_norms.{i}`` ->
    ``norm{i}``); a classifier's head is ``head.fc.*`` (mmpretrain
    ``LinearClsHead``).

The converter (``tools/model_converters/biformer_official2mm.py``) and the
in-memory ``Pretrained`` initialisation of :class:`~.BiFormer` share this
module.
"""
import logging
import os.path as osp
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

OFFICIAL_IN1K = 'official_in1k'
OFFICIAL_DENSE = 'official_dense'
MM = 'mm'

LAST_STAGE = 3
_EXTRA_NORM = re.compile(r'^extra_norms\.(\d+)\.(.+)$')
#: a block of the official STL models: ``stages.{i}.blocks.{j}.<rest>``
_STL_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(.+)$')
#: inside such a block: official name -> ours
_STL_RENAMES = (('mlp.2.', 'mlp.3.'), ('attn.qkv_linear.', 'attn.qkv.qkv.'),
                ('attn.output_linear.', 'attn.wo.'))
#: weights that are 1x1 convs in STL-nchw and linear layers here
_STL_LINEARS = ('mlp.0.weight', 'mlp.3.weight', 'attn.qkv.qkv.weight',
                'attn.wo.weight', 'attn.qkv.weight', 'attn.proj.weight')
_BACKBONE_ROOTS = ('downsample_layers.', 'stages.')


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: truncated, empty or not a
    PyTorch checkpoint at all."""


class CheckpointDownloadError(RuntimeError):
    """A checkpoint URL that could not be downloaded (the message names the
    URL and where the file can be put by hand)."""


def _describe_unreadable(filename: str) -> str:
    """Why a local file that failed to load is not a readable checkpoint
    (empty string when it looks like a complete one)."""
    size = osp.getsize(filename)
    if size == 0:
        return 'the file is empty (0 bytes)'
    with open(filename, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):
        if not zipfile.is_zipfile(filename):
            return (f'the zip archive is incomplete ({size} bytes; truncated '
                    'by an interrupted download or save?)')
        return ''
    if head.startswith(b'\x80'):
        return ''  # a legacy (non-zip) torch.save pickle
    return (f'it is not a PyTorch checkpoint (neither a zip archive nor a '
            f'pickle; {size} bytes starting with {head!r})')


def read_checkpoint(filename: str, map_location: str = 'cpu') -> dict:
    """Load a checkpoint file with mmengine's ``CheckpointLoader``, with
    errors that name the file.

    * a missing file: ``FileNotFoundError``;
    * a file holding pickled objects outside the allow-list (code): the
      loader's refusal (:class:`mmbiformer.utils.UnsafeCheckpointError`
      once :mod:`mmbiformer` is imported) is re-raised unchanged;
    * an empty, truncated or non-checkpoint file:
      :class:`CorruptCheckpointError` saying which.
    """
    from mmengine.runner.checkpoint import _load_checkpoint

    try:
        return _load_checkpoint(filename, map_location=map_location)
    except (FileNotFoundError, CheckpointDownloadError):
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as err:
        local = osp.isfile(osp.expanduser(filename))
        reason = _describe_unreadable(osp.expanduser(filename)) \
            if local else ''
        if not reason:
            if isinstance(err, pickle.UnpicklingError):
                raise  # refused as unsafe, or unreadable pickle data
            reason = 'it could not be read'
        raise CorruptCheckpointError(
            f'Cannot load checkpoint {filename!r}: {reason}. Download or save '
            f'it again. ({type(err).__name__}: {err})') from err


def extract_state_dict(checkpoint: dict) -> Tuple[Dict[str, torch.Tensor],
                                                  str]:
    """The state dict inside a loaded checkpoint and the key it was under.

    Looks for ``state_dict`` (mmengine / mmdet / mmseg), then ``model`` (the
    official ImageNet checkpoints), else takes the dict itself; a
    ``module.`` prefix (DataParallel) on every key is removed.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(
            f'Expected a checkpoint dict, got {type(checkpoint).__name__}')
    if isinstance(checkpoint.get('state_dict'), dict):
        state_dict, where = checkpoint['state_dict'], 'state_dict'
    elif isinstance(checkpoint.get('model'), dict):
        state_dict, where = checkpoint['model'], 'model'
    else:
        state_dict, where = checkpoint, '<root>'
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return OrderedDict(state_dict), where


def detect_format(state_dict: Dict[str, torch.Tensor]) -> str:
    """``'official_in1k'``, ``'official_dense'`` or ``'mm'`` (see module
    doc). Raises ``ValueError`` if no BiFormer backbone key is found."""
    keys = list(state_dict)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if not has(r'(^|\.)(downsample_layers|stages)\.\d'):
        raise ValueError(
            'No BiFormer backbone keys (downsample_layers.*, stages.*) '
            f'found in the checkpoint; first keys: {keys[:5]}')
    if has(r'(^|\.)extra_norms\.\d+\.'):
        return OFFICIAL_DENSE
    if any(k.startswith(_BACKBONE_ROOTS) for k in keys):
        # no prefix: the official ImageNet layout ('norm.*', 'head.*')
        if has(r'^norm\d+\.') or has(r'^head\.fc\.'):
            return MM
        return OFFICIAL_IN1K
    return MM


def official_to_mm_backbone_key(key: str) -> str:
    """Map one official backbone key (no ``backbone.`` prefix) to ours."""
    match = _EXTRA_NORM.match(key)
    if match:
        return f'norm{match.group(1)}.{match.group(2)}'
    if key.startswith('norm.'):
        return f'norm{LAST_STAGE}.' + key[len('norm.'):]
    match = _STL_BLOCK.match(key)
    if match:
        rest = match.group(3)
        for old, new in _STL_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f'stages.{match.group(1)}.{match.group(2)}.{rest}'
    return key


def official_to_mm_backbone_item(key: str, value: torch.Tensor
                                 ) -> Tuple[str, torch.Tensor]:
    """Map one official backbone key and its tensor to ours: the key as
    :func:`official_to_mm_backbone_key`, and the 1x1 conv weights of
    STL-nchw's projections and MLP as linear weights."""
    new = official_to_mm_backbone_key(key)
    if _STL_BLOCK.match(key) and new.endswith(_STL_LINEARS) and \
            value.dim() == 4 and tuple(value.shape[2:]) == (1, 1):
        value = value.flatten(1)
    return new, value


def convert_official_checkpoint(checkpoint: dict) -> Tuple[dict, str]:
    """Convert a whole official checkpoint to the OpenMMLab layout.

    * ImageNet (``{'model': ...}``) -> mmpretrain ``ImageClassifier``:
      ``backbone.*`` (with ``norm.*`` -> ``backbone.norm3.*``) and
      ``head.*`` -> ``head.fc.*``.
    * mmdet/mmseg (``state_dict`` with ``backbone.extra_norms``) -> the same
      detector/segmentor with ``backbone.extra_norms.{i}`` ->
      ``backbone.norm{i}``; every other key is kept.

    Returns:
        tuple: ``({'state_dict': ..., 'meta': ...}, detected_format)``.
    """
    state_dict, _ = extract_state_dict(checkpoint)
    fmt = detect_format(state_dict)
    converted = OrderedDict()
    if fmt == OFFICIAL_IN1K:
        for key, value in state_dict.items():
            if key.startswith('head.'):
                converted['head.fc.' + key[len('head.'):]] = value
            else:
                key, value = official_to_mm_backbone_item(key, value)
                converted['backbone.' + key] = value
    elif fmt == OFFICIAL_DENSE:
        for key, value in state_dict.items():
            if key.startswith('backbone.'):
                key, value = official_to_mm_backbone_item(
                    key[len('backbone.'):], value)
                key = 'backbone.' + key
            converted[key] = value
    else:
        raise ValueError('The checkpoint is already in the OpenMMLab layout '
                         '(no official keys to convert).')
    meta = dict(checkpoint.get('meta') or {})
    meta['converted_from'] = fmt
    return dict(state_dict=converted, meta=meta), fmt


def backbone_state_dict(
        state_dict: Dict[str, torch.Tensor],
        prefix: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Select and map the backbone weights of any supported layout.

    Args:
        state_dict: A state dict from :func:`extract_state_dict`.
        prefix: Keep only keys starting with it and strip it (e.g.
            ``'backbone.'``); ignored when no key has it but the keys are
            backbone keys already (official ImageNet layout). If None and
            the keys carry no backbone prefix themselves, ``'backbone.'``
            is stripped.

    Returns:
        tuple: the mapped backbone state dict and a dict with ``format``,
        ``prefix``, ``renamed`` ({old: new}) and ``dropped`` (head keys).
    """
    fmt = detect_format(state_dict)
    if prefix is None and not any(
            k.startswith(_BACKBONE_ROOTS) for k in state_dict):
        prefix = 'backbone.'
    if prefix:
        selected = {
            k[len(prefix):]: v
            for k, v in state_dict.items() if k.startswith(prefix)
        }
        if not selected:
            if not any(k.startswith(_BACKBONE_ROOTS) for k in state_dict):
                raise ValueError(f'No key of the checkpoint starts with the '
                                 f'prefix {prefix!r}')
            # an official ImageNet checkpoint has no prefix at all
            selected, prefix = dict(state_dict), f'{prefix!r} (not present)'
    else:
        selected = dict(state_dict)
    mapped, renamed, dropped = OrderedDict(), {}, []
    for key, value in selected.items():
        if key.startswith('head.'):
            dropped.append(key)
            continue
        new, value = official_to_mm_backbone_item(key, value)
        if new != key:
            renamed[key] = new
        mapped[new] = value
    info = dict(format=fmt, prefix=prefix, renamed=renamed, dropped=dropped)
    return mapped, info


def _fit_output_norms(module: nn.Module, state_dict: Dict[str, torch.Tensor]
                      ) -> List[str]:
    """Remove ``norm{i}.*`` weights whose kind (BatchNorm with running
    statistics vs LayerNorm) does not match the module's output norm."""
    skipped = []
    groups: Dict[str, List[str]] = {}
    for key in state_dict:
        match = re.match(r'^(norm\d+)\.', key)
        if match:
            groups.setdefault(match.group(1), []).append(key)
    for name, keys in groups.items():
        target = getattr(module, name, None)
        ckpt_is_bn = any(k.endswith('.running_mean') for k in keys)
        if target is None or isinstance(target, nn.Identity):
            compatible = False
        else:
            compatible = ckpt_is_bn == isinstance(
                target, nn.modules.batchnorm._BatchNorm)
        if not compatible:
            for k in keys:
                skipped.append(k)
                del state_dict[k]
    return skipped


class ArchitectureMismatchError(ValueError):
    """A checkpoint whose backbone is another BiFormer architecture (other
    depths or widths) than the model it is loaded into."""


_STAGE_BLOCK = re.compile(r'^stages\.(\d+)\.(\d+)\.')


def backbone_architecture(state_dict: Dict[str, torch.Tensor]) -> dict:
    """The depths and widths of the BiFormer backbone held by a backbone
    state dict (keys without the ``backbone.`` prefix, as
    :func:`backbone_state_dict` returns them, or a model's own).

    Returns:
        dict: ``depths`` (blocks per stage, from the ``stages.{i}.{j}.``
        keys) and ``embed_dims`` (the width of each stage's first block,
        from its ``norm1``; None where the tensor is absent).
    """
    blocks: Dict[int, set] = {}
    for key in state_dict:
        match = _STAGE_BLOCK.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(
                int(match.group(2)))
    n_stages = max([LAST_STAGE + 1] + [i + 1 for i in blocks])
    depths = [len(blocks.get(i, ())) for i in range(n_stages)]
    dims = []
    for i in range(n_stages):
        # the width of the stage's first block (every layout has norm1)
        value = state_dict.get(f'stages.{i}.0.norm1.weight')
        dims.append(int(value.shape[0]) if value is not None else None)
    return dict(depths=depths, embed_dims=dims)


#: the published names of the named archs
ARCH_TITLES = {'tiny': 'BiFormer-T', 'small': 'BiFormer-S',
               'base': 'BiFormer-B', 'stl': 'BiFormer-STL',
               'stl_nchw': 'BiFormer-STL-nchw'}


def architecture_name(arch: dict) -> str:
    """``'BiFormer-T (tiny: depths [2, 2, 8, 2], embed_dims [64, 128, 256,
    512])'``
    or ``'a custom BiFormer (...)'`` when no named architecture has those
    depths and widths."""
    detail = f'depths {arch["depths"]}, embed_dims {arch["embed_dims"]}'
    try:
        from .biformer import BiFormer
        zoo = BiFormer.arch_zoo
    except Exception:  # noqa: BLE001 (the name is a nicety)
        zoo = {}
    names = [name for name, settings in zoo.items()
             if name in ARCH_TITLES
             and list(settings['depths']) == arch['depths']
             and list(settings['embed_dims']) == arch['embed_dims']]
    if names:
        # STL and STL-nchw have the same depths and widths
        titles = ' or '.join(ARCH_TITLES[n] for n in names)
        return f'{titles} ({" or ".join(names)}: {detail})'
    return f'a custom BiFormer ({detail})'


def check_architecture(model_state: Dict[str, torch.Tensor],
                       ckpt_state: Dict[str, torch.Tensor],
                       filename: str = 'the checkpoint') -> None:
    """Raise :class:`ArchitectureMismatchError` if the backbone weights
    ``ckpt_state`` are of another architecture than ``model_state`` (both
    backbone state dicts without prefix). The message names both."""
    ours = backbone_architecture(model_state)
    theirs = backbone_architecture(ckpt_state)
    same_dims = all(a is None or b is None or a == b
                    for a, b in zip(ours['embed_dims'], theirs['embed_dims']))
    if ours['depths'] == theirs['depths'] and same_dims and \
            len(ours['embed_dims']) == len(theirs['embed_dims']):
        return
    raise ArchitectureMismatchError(
        f'Checkpoint {filename!r} holds {architecture_name(theirs)}, but the '
        f'model is {architecture_name(ours)}. Use a checkpoint of the '
        f"model's architecture, or set the model's arch to the "
        f"checkpoint's. To load the tensors that fit anyway (a partial "
        f"load), pass init_cfg=dict(type='Pretrained', checkpoint=..., "
        f'strict=False).')


def _pretrained_strict(module: nn.Module) -> bool:
    """The ``strict`` of the module's ``Pretrained`` init_cfg (True when
    not given)."""
    cfgs = getattr(module, 'init_cfg', None) or []
    if isinstance(cfgs, dict):
        cfgs = [cfgs]
    for cfg in cfgs:
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return bool(cfg.get('strict', True))
    return True


_OUTPUT_NORM = re.compile(r'^norm\d+\.')


def load_biformer_checkpoint(module: nn.Module,
                             filename: str,
                             prefix: Optional[str] = None,
                             map_location: str = 'cpu',
                             logger=None,
                             strict: Optional[bool] = None) -> dict:
    """Load any supported checkpoint into a :class:`~.BiFormer` backbone.

    The file is read with mmengine's ``CheckpointLoader`` (local paths,
    ``http(s)://``, ``open-mmlab://`` ...), its format detected, its keys
    mapped in memory and loaded; a report naming renamed, dropped, skipped,
    missing and unexpected keys is logged.

    Args:
        strict: True: a checkpoint of another architecture (other depths
            or widths, e.g. BiFormer-T weights for a BiFormer-S model) is
            an :class:`ArchitectureMismatchError` that names both. False:
            load whatever fits (a partial load) and report the rest. None
            (default): the ``strict`` key of the module's ``Pretrained``
            ``init_cfg``, True when absent. Within one architecture the
            load is always non-strict: individual missing, unexpected or
            mis-shaped tensors are reported, not raised.

    Returns:
        dict: the report (``format``, ``architecture``, ``missing``,
        ``new_norms`` (output norms of this backbone that the checkpoint
        does not have, e.g. loading a classifier into a dense-prediction
        backbone: freshly initialised, not counted as missing),
        ``unexpected``, ``shape_mismatch``, ``skipped_norms``, ``dropped``,
        ``renamed``).
    """
    from mmengine.logging import MMLogger, print_log

    if logger is None:
        logger = MMLogger.get_current_instance()
    if strict is None:
        strict = _pretrained_strict(module)
    checkpoint = read_checkpoint(filename, map_location=map_location)
    try:
        state_dict, where = extract_state_dict(checkpoint)
        mapped, info = backbone_state_dict(state_dict, prefix)
    except (TypeError, ValueError) as err:
        raise type(err)(f'Checkpoint {filename!r}: {err}') from err
    own = module.state_dict()
    if strict:
        check_architecture(own, mapped, filename)
    skipped = _fit_output_norms(module, mapped)

    mismatch = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in mapped.items() if k in own and v.shape != own[k].shape
    ]
    mismatched = [
        k for k in mapped if k in own and mapped[k].shape != own[k].shape
    ]
    for k in mismatched:
        del mapped[k]
    result = module.load_state_dict(mapped, strict=False)

    # output norms the checkpoint has in this backbone's kind (the others
    # were skipped above): a key of one of them that is missing is missing
    ckpt_norms = {k.split('.')[0] for k in mapped if _OUTPUT_NORM.match(k)}
    missing = [k for k in result.missing_keys if k not in mismatched]
    new_norms = [k for k in missing if _OUTPUT_NORM.match(k)
                 and k.split('.')[0] not in ckpt_norms]
    report = dict(
        format=info['format'],
        architecture=architecture_name(backbone_architecture(own)),
        missing=[k for k in missing if k not in new_norms],
        new_norms=new_norms,
        unexpected=list(result.unexpected_keys),
        shape_mismatch=mismatch,
        skipped_norms=skipped,
        dropped=info['dropped'],
        renamed=info['renamed'])
    lines = [
        f'{type(module).__name__}: loaded {filename} '
        f'(format {info["format"]}, weights under {where!r}, prefix '
        f'{info["prefix"]!r}): {len(mapped) - len(report["unexpected"])} '
        f'tensors loaded into {report["architecture"]}.'
    ]
    if info['renamed']:
        pairs = sorted({(k.split('.')[0] + '.*', v.split('.')[0] + '.*')
                        for k, v in info['renamed'].items()})
        lines.append('renamed: ' + ', '.join(f'{a} -> {b}' for a, b in pairs))
    if info['dropped']:
        lines.append(f'dropped (classification head, not part of the '
                     f'backbone): {info["dropped"]}')
    if skipped:
        lines.append('skipped (output norm of another kind or not used by '
                     f'this backbone): {skipped}')
    if new_norms:
        lines.append('output norms of this backbone that the checkpoint '
                     'does not have (freshly initialised): '
                     + ', '.join(sorted({k.split('.')[0]
                                         for k in new_norms})))
    for title, keys in (('shape mismatch', mismatch),
                        ('missing keys', report['missing']),
                        ('unexpected keys', report['unexpected'])):
        if keys:
            lines.append(f'{title}: {keys}')
    level = logging.WARNING if (mismatch or report['missing']
                                or report['unexpected']) else logging.INFO
    print_log('\n'.join(lines), logger=logger, level=level)
    return report
