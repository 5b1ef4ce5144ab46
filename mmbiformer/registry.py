"""Registration of mmbiformer's modules into the OpenMMLab registries.

This is the one place that registers

* the backbone :class:`mmbiformer.models.BiFormer` as ``'BiFormer'`` into
  the ``MODELS`` registry of mmpretrain, mmdet and mmseg (each only if that
  toolbox is installed), so that ``backbone=dict(type='BiFormer', ...)``
  works in their stock configs after ``import mmbiformer`` (or
  ``custom_imports=dict(imports=['mmbiformer'])``);
* the op :class:`mmbiformer.ops.BiLevelRoutingAttention` as
  ``'BiLevelRoutingAttention'`` into mmengine's root ``MODELS`` registry
  (visible from every toolbox's registry, which are its children).

Importing this module again registers nothing twice.
"""
import importlib
import importlib.util
import warnings
from typing import Dict, List

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

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


def register_all_modules() -> List[str]:
    """Register the backbone and the op; returns the toolboxes used."""
    _register(MMENGINE_MODELS, 'BiLevelRoutingAttention',
              BiLevelRoutingAttention)
    for package in TOOLBOX_REGISTRIES:
        models = _toolbox_models(package)
        if models is None:
            continue
        _register(models, 'BiFormer', BiFormer)
        if package not in REGISTERED_IN:
            REGISTERED_IN.append(package)
    return list(REGISTERED_IN)


register_all_modules()
