"""mmbiformer: BiFormer and bi-level routing attention for OpenMMLab 2.x.

Importing the package
  * makes mmengine's checkpoint loading safe and working on torch >= 2.6
    (see :mod:`mmbiformer.utils.safe_load`) and checkpoint saving atomic
    (:mod:`mmbiformer.utils.atomic_save`), and
  * registers the ``BiFormer`` backbone and the ``BiLevelRoutingAttention``
    op into the registries of whichever OpenMMLab toolboxes are installed.

The attention op itself (:mod:`mmbiformer.ops`) needs only torch and einops.
"""
import importlib.util

from .version import __version__

if importlib.util.find_spec('mmengine') is not None:
    from .utils.atomic_save import enable_atomic_checkpoint_saving
    from .utils.safe_load import enable_safe_checkpoint_loading

    enable_safe_checkpoint_loading()
    enable_atomic_checkpoint_saving()

    from . import registry  # noqa: F401  (registers into the toolboxes)

__all__ = ['__version__']
