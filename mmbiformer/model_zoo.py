"""Where the model zoo's index and configs live, its mmpretrain entry, and
the official checkpoints by URL.

A source checkout (or editable install) keeps ``model-index.yml`` and
``configs/`` beside the package; a built wheel carries copies under
``mmbiformer/.mim/`` (see ``setup.py``), which is also where ``mim`` looks.

The official ImageNet checkpoints are public URLs (:data:`OFFICIAL_WEIGHTS`,
from the official README) that all end in ``/content``: downloaded as
usual they would all be cached as one file named ``content``. Checkpoint
URLs ending in ``/content`` therefore load through
:func:`load_content_url` (registered into mmengine's ``CheckpointLoader`` by
:mod:`mmbiformer.registry`): each is cached under its own name
(:func:`checkpoint_cache_name`) and an official checkpoint is converted to
the OpenMMLab layout on the fly. That serves
``mmpretrain.get_model('biformer_s_in1k', pretrained=True)``,
``init_cfg=dict(type='Pretrained', checkpoint=URL)`` and ``load_from``.
"""
from __future__ import annotations

import hashlib
import os
import os.path as osp
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

__all__ = [
    'CONTENT_URL_PATTERN', 'OFFICIAL_WEIGHTS', 'checkpoint_cache_name',
    'download_checkpoint', 'load_content_url', 'register_mmpretrain_models',
    'register_url_loader', 'zoo_root'
]

_SHARES = 'https://api.onedrive.com/v1.0/shares/'
#: model name -> the official ImageNet-1K checkpoint (official README)
OFFICIAL_WEIGHTS = {
    'biformer_t_in1k': _SHARES + 's!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content',
    'biformer_s_in1k': _SHARES + 's!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content',
    'biformer_b_in1k': _SHARES + 's!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content',
    'biformer_stl_in1k':
    _SHARES + 's!AkBbczdRlZvChSf-m7ujkvx9lIQ1/root/content',
    'biformer_stl_nchw_in1k':
    _SHARES + 's!AkBbczdRlZvChWYrKbWbMgqd2Ai0/root/content',
}
#: mmengine matches scheme prefixes as regular expressions, longest first
CONTENT_URL_PATTERN = r'https?://[^?#]*/content$'

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


def checkpoint_cache_name(url: str) -> str:
    """The cache file name of a checkpoint URL: ``<model>_official.pth``
    for an official checkpoint, else the URL's file name, made unique by a
    hash of the URL where it says nothing (``content``, no extension)."""
    for name, official in OFFICIAL_WEIGHTS.items():
        if url == official:
            return f'{name}_official.pth'
    base = osp.basename(urlparse(url).path) or 'checkpoint'
    if base.endswith(('.pth', '.pt', '.ckpt', '.bin')) and base != 'content':
        return base
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f'{base}-{digest}.pth'


def _cache_dir(model_dir: Optional[str]) -> str:
    if model_dir is not None:
        return model_dir
    import torch.hub
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def download_checkpoint(url: str, model_dir: Optional[str] = None,
                        progress: bool = True) -> str:
    """The local path of a checkpoint URL, downloading it once into
    ``model_dir`` (default: torch hub's ``checkpoints`` folder) under
    :func:`checkpoint_cache_name`. Without network access the error names
    the URL and the path where the file can be put by hand."""
    import torch.hub

    from .models.checkpoint import CheckpointDownloadError
    folder = _cache_dir(model_dir)
    path = osp.join(folder, checkpoint_cache_name(url))
    if osp.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, progress=progress)
    except (OSError, ValueError) as err:  # URLError and HTTPError too
        raise CheckpointDownloadError(
            f'Could not download the checkpoint {url} ({type(err).__name__}: '
            f'{err}). Without network access, download it on another '
            f'machine and put it at {path}; it is then used from there.'
        ) from err
    return path


def load_content_url(filename: str, map_location=None,
                     model_dir: Optional[str] = None,
                     progress: bool = os.isatty(0)) -> dict:
    """mmengine ``CheckpointLoader`` scheme for URLs ending in
    ``/content``: downloads to a file of the URL's own
    (:func:`download_checkpoint`; rank 0 first when distributed), loads it
    with mmengine's local loader and converts an official BiFormer
    checkpoint to the OpenMMLab layout
    (:func:`mmbiformer.models.checkpoint.convert_official_checkpoint`);
    any other checkpoint is returned as it is."""
    from mmengine.dist import barrier, get_dist_info

    from .models.checkpoint import (
        MM,
        convert_official_checkpoint,
        detect_format,
        extract_state_dict,
        read_checkpoint,
    )
    rank, world_size = get_dist_info()
    if rank == 0:
        path = download_checkpoint(filename, model_dir, progress)
    if world_size > 1:
        barrier()
        if rank > 0:
            path = download_checkpoint(filename, model_dir, progress)
    checkpoint = read_checkpoint(path, map_location=map_location)
    try:
        official = detect_format(extract_state_dict(checkpoint)[0]) != MM
    except (TypeError, ValueError):
        return checkpoint  # not a BiFormer checkpoint: leave it alone
    if official:
        checkpoint, _ = convert_official_checkpoint(checkpoint)
    return checkpoint


def register_url_loader() -> None:
    """Register :func:`load_content_url` for :data:`CONTENT_URL_PATTERN` in
    mmengine's ``CheckpointLoader`` (other URLs keep mmengine's loader)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(
        prefixes=CONTENT_URL_PATTERN, loader=load_content_url, force=True)
