"""Package build; metadata and pins live in setup.cfg."""
from setuptools import setup

setup()
