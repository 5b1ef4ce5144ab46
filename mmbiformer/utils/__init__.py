from .safe_load import (
                        UnsafeCheckpointError,
                        checkpoint_safe_globals,
                        enable_safe_checkpoint_loading,
)

__all__ = [
    'UnsafeCheckpointError', 'checkpoint_safe_globals',
    'enable_safe_checkpoint_loading'
]
