"""The BiFormer backbone and its building blocks.

Needs torch, mmengine and mmcv; knows nothing of mmdet or mmseg (the
registration into the toolboxes lives in :mod:`mmbiformer.registry`).
"""
from .biformer import BiFormer
from .checkpoint import (
                         convert_official_checkpoint,
                         detect_format,
                         load_biformer_checkpoint,
)
from .complexity import count_params, flop_analysis
from .layers import BiFormerBlock, GlobalAttention, LayerNorm2d

__all__ = [
    'BiFormer', 'BiFormerBlock', 'GlobalAttention', 'LayerNorm2d',
    'convert_official_checkpoint', 'count_params', 'detect_format',
    'flop_analysis', 'load_biformer_checkpoint'
]
