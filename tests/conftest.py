"""Suite-wide isolation."""
import pytest


@pytest.fixture(autouse=True)
def _restore_default_scope():
    """Undo the mmengine default scope a test leaves behind.

    Building a runner or calling ``init_default_scope`` makes that toolbox's
    scope current for the whole process, and later builds through another
    toolbox's registry would be redirected to it.
    """
    try:
        from mmengine.registry import DefaultScope
    except ImportError:  # the op tests also run without mmengine
        yield
        return
    saved = dict(DefaultScope._instance_dict)
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)
