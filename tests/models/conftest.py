import pytest

from .official import read_manifest


@pytest.fixture(scope='module')
def manifest() -> dict:
    """``manifest.json`` of the official reference fixtures."""
    return read_manifest()
