"""Metrics the toolboxes lack: ImageNet-C's corruption errors and mCE."""
from .mce import ALEXNET_ERRORS, ImageNetCMetric, corruption_summary

__all__ = ['ALEXNET_ERRORS', 'ImageNetCMetric', 'corruption_summary']
