"""Where the official reference fixtures are and how the tests read them
(``../shared/fixtures/official``, or ``MMBIFORMER_FIXTURES``)."""
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# MMBIFORMER_FIXTURES points elsewhere where the folder cannot sit beside
# the checkout (e.g. a GPU machine that receives the repository alone)
FIXTURES = Path(os.environ.get(
    'MMBIFORMER_FIXTURES', REPO / '..' / 'shared' / 'fixtures' / 'official'))
TOL = 1e-5

#: the ``pytestmark`` of a module that needs the fixtures
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / 'manifest.json').is_file(),
    reason='official reference fixtures not found in ../shared/fixtures/'
    'official beside the repository root')


def load(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location='cpu', weights_only=True)


def read_manifest() -> dict:
    with open(FIXTURES / 'manifest.json') as f:
        return json.load(f)
