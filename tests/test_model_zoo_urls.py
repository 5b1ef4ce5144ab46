"""Official checkpoints by URL: one cache file per URL (their URLs all end
in ``/content``), converted on the fly; served here by a local HTTP server
on 127.0.0.1 (nothing reaches the internet)."""
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip('mmpretrain')

import mmbiformer  # noqa: E402,F401  (registers the URL loader)
from mmbiformer.model_zoo import OFFICIAL_WEIGHTS, checkpoint_cache_name  # noqa: E402
from mmbiformer.models import BiFormer  # noqa: E402
from mmbiformer.models.checkpoint import CheckpointDownloadError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get(
    'MMBIFORMER_FIXTURES', REPO / '..' / 'shared' / 'fixtures' / 'official'))
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / 'manifest.json').is_file(),
    reason='official reference fixtures not found')

from mini_arch import MINI  # noqa: E402

STL_MINI = dict(BiFormer.arch_zoo['stl'], embed_dims=[32, 64, 128, 256],
                depths=[1, 1, 2, 1], mlp_ratios=[2, 2, 2, 2])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields the base URL."""
    www = tmp_path / 'www'
    www.mkdir()
    handler = functools.partial(_Quiet, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f'http://127.0.0.1:{httpd.server_address[1]}'
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    return tmp_path / 'torch_home' / 'hub' / 'checkpoints'


def serve(www: Path, name: str, src: Path) -> str:
    (www / name).mkdir(parents=True)
    shutil.copy(src, www / name / 'content')
    return f'{name}/content'


def test_official_urls_get_their_own_cache_names():
    assert len(OFFICIAL_WEIGHTS) == 5
    names = {checkpoint_cache_name(u) for u in OFFICIAL_WEIGHTS.values()}
    assert names == {f'{m}_official.pth' for m in OFFICIAL_WEIGHTS}
    a = checkpoint_cache_name('http://example.org/x/content')
    b = checkpoint_cache_name('http://example.org/y/content')
    assert a != b and a.startswith('content-') and a.endswith('.pth')
    assert checkpoint_cache_name('http://h/m/model.pth') == 'model.pth'


def test_metafile_weights_are_the_official_urls():
    from mmpretrain.apis import ModelHub
    for name, url in OFFICIAL_WEIGHTS.items():
        assert ModelHub.get(name).weights == url


@needs_fixtures
def test_two_models_by_url_two_cache_files(server, hub_dir):
    """Two ``.../content`` URLs land in two files and load as their own
    architectures (BiFormer and BiFormer-STL), reproducing the official
    outputs."""
    www, base = server
    urls = {
        'mini': base + '/' + serve(
            www, 'a', FIXTURES / 'biformer_mini_in1k_official.pth'),
        'stl': base + '/' + serve(
            www, 'b', FIXTURES / 'biformer_stl_mini_official.pth'),
    }
    cases = [('mini', MINI, 'biformer_mini_in1k_io.pth'),
             ('stl', STL_MINI, 'biformer_stl_mini_io.pth')]
    for key, arch, io_name in cases:
        backbone = BiFormer(arch=arch, init_cfg=dict(
            type='Pretrained', checkpoint=urls[key]))
        backbone.init_weights()
        report = backbone.checkpoint_report
        assert report['missing'] == [] and report['unexpected'] == []
        io = torch.load(FIXTURES / io_name, weights_only=True)
        outs = []
        hooks = [s[-1].register_forward_hook(
            lambda m, i, o, outs=outs: outs.append(o))
            for s in backbone.stages]
        with torch.no_grad():
            backbone.eval()(io['input'])
        for h in hooks:
            h.remove()
        for ours, official in zip(outs, io['stage_outputs']):
            assert (ours - official).abs().max() <= 1e-5
    files = sorted(p.name for p in hub_dir.iterdir())
    assert len(files) == 2
    assert files == sorted(checkpoint_cache_name(u) for u in urls.values())
    # the second load reads the cache: no server needed
    www.rename(www.parent / 'gone')
    BiFormer(arch=MINI, init_cfg=dict(type='Pretrained',
                                      checkpoint=urls['mini'])).init_weights()


@needs_fixtures
def test_mmengine_load_checkpoint_converts_on_the_fly(server, hub_dir):
    """``load_checkpoint`` (what ``get_model(..., pretrained=URL)`` and
    ``load_from`` use) gets the OpenMMLab layout: a strict load into an
    mmpretrain classifier."""
    import mmpretrain
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import MODELS

    www, base = server
    url = base + '/' + serve(
        www, 'c', FIXTURES / 'biformer_stl_nchw_mini_official.pth')
    arch = dict(BiFormer.arch_zoo['stl_nchw'], embed_dims=[32, 64, 128, 256],
                depths=[1, 1, 2, 1], mlp_ratios=[2, 2, 2, 2])
    cfg = dict(type='ImageClassifier',
               backbone=dict(type='BiFormer', arch=arch),
               neck=dict(type='GlobalAveragePooling'),
               head=dict(type='LinearClsHead', num_classes=10,
                         in_channels=256))
    model = MODELS.build(cfg)
    load_checkpoint(model, url, map_location='cpu', strict=True)
    io = torch.load(FIXTURES / 'biformer_stl_nchw_mini_io.pth',
                    weights_only=True)
    with torch.no_grad():
        logits = model.eval()(io['input'])
    assert (logits - io['logits']).abs().max() <= 1e-5
    # and through mmpretrain's get_model with a config and a URL
    from mmengine.config import Config
    model = mmpretrain.get_model(Config(dict(model=cfg)), pretrained=url)
    with torch.no_grad():
        logits = model.eval()(io['input'])
    assert (logits - io['logits']).abs().max() <= 1e-5


def test_offline_error_names_url_and_path(server, hub_dir):
    _, base = server
    url = f'{base}/missing/content'
    with pytest.raises(CheckpointDownloadError) as err:
        BiFormer(arch=MINI, init_cfg=dict(type='Pretrained',
                                          checkpoint=url)).init_weights()
    message = str(err.value)
    assert url in message
    assert str(hub_dir / checkpoint_cache_name(url)) in message
