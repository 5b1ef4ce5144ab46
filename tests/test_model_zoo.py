"""The model zoo index is complete and mmpretrain's hub builds our models."""
import os.path as osp

from modelindex.load_model_index import load

import mmbiformer  # noqa: F401
from mmbiformer.model_zoo import zoo_root

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _index_models():
    index = load(osp.join(REPO, 'model-index.yml'))
    index.build_models_with_collections()
    return index.models


def test_every_config_is_in_the_index_and_exists():
    import glob
    models = _index_models()
    configs = {m.config for m in models}
    # the model folders; configs/robustness/ evaluates these models on
    # other test sets and holds no model of its own
    on_disk = {
        osp.relpath(p, REPO)
        for task in ('classification', 'detection', 'segmentation')
        for p in glob.glob(osp.join(REPO, 'configs', task, '*.py'))
    }
    assert configs == on_disk
    assert len(models) == 15
    for m in models:
        assert m.results, f'{m.name} has no published result'


def test_zoo_root_is_the_checkout():
    assert zoo_root() is not None
    assert osp.isfile(zoo_root() / 'model-index.yml')


def test_mmpretrain_hub_lists_and_builds_biformer():
    import mmpretrain
    names = mmpretrain.list_models('*biformer*')
    assert names == ['biformer_b_in1k', 'biformer_b_tl_in1k',
                     'biformer_s_in1k', 'biformer_s_tl_in1k',
                     'biformer_stl_in1k', 'biformer_stl_nchw_in1k',
                     'biformer_t_in1k']
    model = mmpretrain.get_model('biformer_t_in1k')
    assert type(model.backbone).__name__ == 'BiFormer'
    assert sum(p.numel() for p in model.parameters()) == 13_142_760


def test_mmpretrain_hub_builds_the_stl_models():
    import mmpretrain
    for name in ('biformer_stl_in1k', 'biformer_stl_nchw_in1k'):
        model = mmpretrain.get_model(name)
        assert sum(p.numel() for p in model.parameters()) == 28_372_552
    assert model.backbone.routing_attentions()[0].pad_mode == 'after_qkv'
