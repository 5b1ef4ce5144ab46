"""The mini BiFormer architecture of the tests (and of the official
reference fixtures in ``shared/fixtures/official``): every stage kind of the
real models (routing attention with topk 1, 4 and 16, then global attention
with LePE) at a fraction of the cost. ``tests/`` is on ``sys.path`` for every
test module (pytest's rootdir-based imports), so ``from mini_arch import
MINI`` works from any test folder."""
MINI = dict(
    embed_dims=[32, 64, 128, 256],
    depths=[1, 1, 2, 1],
    head_dim=32,
    mlp_ratios=[3, 3, 3, 3],
    topks=[1, 4, 16, -2])
