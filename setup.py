"""Package build; metadata and pins live in setup.cfg.

A built wheel carries the model zoo (``model-index.yml``, ``configs/``) and
``tools/`` under ``mmbiformer/.mim/``, where ``mim`` and
:mod:`mmbiformer.model_zoo` look for them. Editable installs use the files of
the checkout directly.
"""
import os
import os.path as osp
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

MIM_FILES = ('model-index.yml', 'configs', 'tools')


class BuildWithModelZoo(build_py):

    def run(self):
        super().run()
        if self.editable_mode:
            return
        here = osp.dirname(osp.abspath(__file__))
        target = osp.join(self.build_lib, 'mmbiformer', '.mim')
        os.makedirs(target, exist_ok=True)
        for name in MIM_FILES:
            src, dst = osp.join(here, name), osp.join(target, name)
            if osp.isdir(src):
                shutil.copytree(src, dst, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns('__pycache__'))
            elif osp.isfile(src):
                shutil.copy2(src, dst)


setup(cmdclass={'build_py': BuildWithModelZoo})
