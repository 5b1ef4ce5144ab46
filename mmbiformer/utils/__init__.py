from .atomic_save import (
    atomic_torch_save,
    enable_atomic_checkpoint_saving,
    find_latest_checkpoint,
)
from .safe_load import (
    UnsafeCheckpointError,
    checkpoint_safe_globals,
    enable_safe_checkpoint_loading,
)

__all__ = [
    'UnsafeCheckpointError', 'atomic_torch_save', 'checkpoint_safe_globals',
    'enable_atomic_checkpoint_saving', 'enable_safe_checkpoint_loading',
    'find_latest_checkpoint'
]
