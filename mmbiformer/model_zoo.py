"""Where the model zoo's index and configs live, and its mmpretrain entry.

A source checkout (or editable install) keeps ``model-index.yml`` and
``configs/`` beside the package; a built wheel carries copies under
``mmbiformer/.mim/`` (see ``setup.py``), which is also where ``mim`` looks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ['zoo_root', 'register_mmpretrain_models']

_REGISTERED = False


def zoo_root() -> Optional[Path]:
    """Folder holding ``model-index.yml`` and ``configs/``, if any."""
    package = Path(__file__).resolve().parent
    for root in (package / '.mim', package.parent):
        if (root / 'model-index.yml').is_file() and (root /
                                                     'configs').is_dir():
            return root
    return None


def register_mmpretrain_models() -> bool:
    """Add the classification models to mmpretrain's model hub.

    Afterwards ``mmpretrain.list_models('*biformer*')`` lists them and
    ``mmpretrain.get_model('biformer_s_in1k')`` builds one. Detection and
    segmentation models stay out: mmpretrain's hub builds classifiers only.

    Returns:
        bool: whether the models are registered.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    root = zoo_root()
    if root is None:
        return False
    from mmpretrain.apis.model import ModelHub
    metafile = root / 'configs' / 'classification' / 'metafile.yml'
    if not ModelHub.has('biformer_t_in1k'):
        ModelHub.register_model_index(metafile, config_prefix=root)
    _REGISTERED = True
    return True
