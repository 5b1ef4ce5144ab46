"""Data pieces the toolboxes lack: token-labeling label maps and the
transforms that keep them aligned with the image (needs mmpretrain)."""
from .token_label import (
                          PHOTOMETRIC_RANDAUG_POLICIES,
                          LoadTokenLabel,
                          ResampleTokenLabel,
                          TokenLabelFileError,
                          TokenLabelRandomFlip,
                          TokenLabelRandomResizedCrop,
                          align_label_map,
                          dense_label_map,
                          load_token_label,
                          token_label_path,
)

__all__ = [
    'PHOTOMETRIC_RANDAUG_POLICIES', 'LoadTokenLabel', 'ResampleTokenLabel',
    'TokenLabelFileError', 'TokenLabelRandomFlip',
    'TokenLabelRandomResizedCrop', 'align_label_map', 'dense_label_map',
    'load_token_label', 'token_label_path'
]
