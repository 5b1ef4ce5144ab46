"""Registration of mmbiformer's modules into the OpenMMLab registries.

This is the one place that registers

* the backbone :class:`mmbiformer.models.BiFormer` as ``'BiFormer'`` into
  the ``MODELS`` registry of mmpretrain, mmdet and mmseg (each only if that
  toolbox is installed), so that ``backbone=dict(type='BiFormer', ...)``
  works in their stock configs after ``import mmbiformer`` (or
  ``custom_imports=dict(imports=['mmbiformer'])``);
* the op :class:`mmbiformer.ops.BiLevelRoutingAttention` as
  ``'BiLevelRoutingAttention'`` into mmengine's root ``MODELS`` registry
  (visible from every toolbox's registry, which are its children);
* FLOP-counter handles for the ops that fvcore-style counters skip (the
  routing attention's fused autograd functions and
  ``aten::scaled_dot_product_attention``) into the defaults of
  ``mmengine.analysis``, so stock tools such as mmpretrain's
  ``get_flops.py`` (``get_model_complexity_info``) count them too. Handles
  the defaults already have are left alone;
* the training hook :class:`mmbiformer.engine.RNGStateHook` (exact
  ``--resume``) into mmengine's root ``HOOKS`` registry (by importing
  :mod:`mmbiformer.engine`);
* the classification model zoo into mmpretrain's model hub
  (:func:`mmbiformer.model_zoo.register_mmpretrain_models`), so that
  ``mmpretrain.list_models('*biformer*')`` and ``mmpretrain.get_model``
  know the BiFormer classifiers;
* token labeling (BiFormer-S*/B*) into mmpretrain: the classifier, head
  and loss of :mod:`mmbiformer.models.token_labeling` into its ``MODELS``
  and the label-map transforms of :mod:`mmbiformer.datasets` into its
  ``TRANSFORMS``;
* the robustness benchmarks into mmpretrain: the datasets ``ImageNetV2``
  and ``ImageNetC`` into its ``DATASETS`` and the metric
  ``ImageNetCMetric`` (mCE) into its ``METRICS``;
* a checkpoint loader for URLs ending in ``/content`` (the official
  checkpoints' URLs) into mmengine's ``CheckpointLoader``
  (:func:`mmbiformer.model_zoo.register_url_loader`): one cache file per
  URL, official checkpoints converted on the fly.

Importing this module again registers nothing twice.
"""
import importlib
import importlib.util
import warnings
from typing import Dict, List

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

from . import engine  # noqa: F401  (registers RNGStateHook)
from .models import BiFormer
from .ops import BiLevelRoutingAttention

#: toolbox package -> module holding its ``MODELS`` registry
TOOLBOX_REGISTRIES: Dict[str, str] = {
    'mmpretrain': 'mmpretrain.registry',
    'mmdet': 'mmdet.registry',
    'mmseg': 'mmseg.registry',
}

#: toolboxes whose ``MODELS`` got the backbone (filled at import)
REGISTERED_IN: List[str] = []


def _register(registry: Registry, name: str, module: type) -> None:
    existing = registry.module_dict.get(name)
    if existing is module:
        return
    if existing is not None and (existing.__module__, existing.__qualname__
                                 ) != (module.__module__, module.__qualname__):
        warnings.warn(f'{registry.name} registry: {name!r} was '
                      f'{existing.__module__}.{existing.__qualname__}; '
                      f'replacing it with {module.__module__}.'
                      f'{module.__qualname__}',
                      stacklevel=2)
    # force: a reloaded module defines a new class object under the same name
    registry.register_module(name=name, module=module, force=True)


def _toolbox_models(package: str):
    """The toolbox's MODELS registry, or None when it is not installed."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.import_module(TOOLBOX_REGISTRIES[package]).MODELS
    except Exception as err:  # a broken toolbox must not break the others
        warnings.warn(f'{package} is installed but its registry could not be '
                      f'imported ({err!r}); BiFormer is not registered '
                      f'there.',
                      stacklevel=2)
        return None


def register_flop_handles() -> List[str]:
    """Add BiFormer's FLOP handles to mmengine's default handles.

    Returns the op names added (none if mmengine has no such defaults).
    """
    from .models.complexity import biformer_flop_handles
    try:
        from mmengine.analysis import complexity_analysis
        defaults = complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS
    except (ImportError, AttributeError):
        return []
    added = []
    for name, handle in biformer_flop_handles().items():
        if name not in defaults:
            defaults[name] = handle
            added.append(name)
    return added


def register_token_labeling() -> None:
    """Register the token-labeling models and transforms into mmpretrain's
    ``MODELS`` and ``TRANSFORMS``."""
    from mmpretrain.registry import MODELS, TRANSFORMS

    from .datasets.token_label import TRANSFORMS as TL_TRANSFORMS
    from .models.token_labeling import MODELS as TL_MODELS
    for name, cls in TL_MODELS.items():
        _register(MODELS, name, cls)
    for name, cls in TL_TRANSFORMS.items():
        _register(TRANSFORMS, name, cls)


def register_robustness() -> None:
    """Register the ImageNet-V2 and ImageNet-C datasets and the mCE metric
    into mmpretrain's ``DATASETS`` and ``METRICS``."""
    from mmpretrain.registry import DATASETS, METRICS

    from .datasets.imagenet_c import ImageNetC
    from .datasets.imagenet_v2 import ImageNetV2
    from .evaluation.mce import ImageNetCMetric
    _register(DATASETS, 'ImageNetV2', ImageNetV2)
    _register(DATASETS, 'ImageNetC', ImageNetC)
    _register(METRICS, 'ImageNetCMetric', ImageNetCMetric)


def register_all_modules() -> List[str]:
    """Register the backbone, the op and the FLOP handles; returns the
    toolboxes whose ``MODELS`` hold the backbone."""
    register_flop_handles()
    _register(MMENGINE_MODELS, 'BiLevelRoutingAttention',
              BiLevelRoutingAttention)
    for package in TOOLBOX_REGISTRIES:
        models = _toolbox_models(package)
        if models is None:
            continue
        _register(models, 'BiFormer', BiFormer)
        if package not in REGISTERED_IN:
            REGISTERED_IN.append(package)
    from .model_zoo import register_url_loader
    register_url_loader()
    if 'mmpretrain' in REGISTERED_IN:
        from .model_zoo import register_mmpretrain_models
        register_mmpretrain_models()
        register_token_labeling()
        register_robustness()
    return list(REGISTERED_IN)


register_all_modules()
