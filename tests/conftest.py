"""Suite-wide isolation."""
import os
import tempfile

import pytest

# A compile cache of this test session's own: inductor's on-disk cache keys
# a traced graph by what dynamo saw, not by the Python of a custom op's
# autograd formula, so graphs traced by an older version of the code (or by
# another session) could be loaded instead of compiling the code under
# test. Subprocesses started by the tests inherit it.
_OWN_CACHE = None
if 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix='mmbiformer-tests-inductor-')
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
