"""Training-loop additions (hooks) for mmengine runners."""
from .hooks import (
    RNGStateHook,
    SyncNormStatsHook,
    capture_rng_state,
    restore_rng_state,
)

__all__ = ['RNGStateHook', 'SyncNormStatsHook', 'capture_rng_state',
           'restore_rng_state']
