"""Process memory readings for the CPU benchmarks (Linux ``/proc``).

Shared by ``tools/analysis/benchmark.py`` and
``tools/analysis/benchmark_bra.py``; needs nothing beyond the standard
library.
"""
from typing import Optional

__all__ = ['proc_status_kb', 'reset_peak_rss']


def proc_status_kb(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ...), or
    None where the file or field is missing."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False
