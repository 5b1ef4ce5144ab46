"""Fixtures of the tool tests: small built-in data, running the tools."""
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PYTHON = sys.executable
sys.path.insert(0, osp.join(REPO, 'tools', 'dataset_converters'))

import make_demo_data  # noqa: E402


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """Built-in data at a tenth of the demo's size (a few seconds)."""
    root = str(tmp_path_factory.mktemp('demo_data'))
    make_demo_data.make(root, seed=0, scale=0.1, log=lambda *a: None)
    return root


def tool_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '2')
    env['PYTHONWARNINGS'] = 'ignore'
    return env


def run(cmd, timeout=900, cwd=REPO, check=True, env=None):
    """Run a command from the repository root; on failure show its end.
    ``env``: variables added to :func:`tool_env`'s."""
    proc = subprocess.run(cmd, cwd=cwd, env=dict(tool_env(), **(env or {})),
                          timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if check and proc.returncode != 0:
        pytest.fail(f'{" ".join(cmd)} exited with {proc.returncode}:\n'
                    + proc.stdout[-6000:])
    return proc


def free_port() -> str:
    """A TCP port nobody listens on now (for a launcher's ``PORT``)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return str(sock.getsockname()[1])
