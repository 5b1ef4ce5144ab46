"""Kernels per step and the busy fraction of a device, from torch.profiler.

:func:`profile_step` runs one step under ``torch.profiler`` and
:func:`summarize` reads the trace:

* on CUDA the work items are the device's activities: kernels, copies and
  memsets (``activity_type`` ``kernel``, ``gpu_memcpy``, ``gpu_memset``;
  kernels replayed from a CUDA graph included);
* on the CPU they are the innermost operators (``cpu_op`` events without
  an operator below them), so the same arithmetic can be checked on any
  machine.

``busy_fraction`` is the union of the work items' time inside the step
(the ``record_function`` range around the step and its synchronisation)
over the step's wall time: 1.0 means the device never waited for the host.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

__all__ = ['STEP_RANGE', 'profile_step', 'summarize', 'union_length']

#: name of the ``record_function`` range around the profiled step
STEP_RANGE = 'mmbiformer.benchmark_step'
_DEVICE_WORK = ('kernel', 'gpu_memcpy', 'gpu_memset')


def union_length(intervals: Iterable[Tuple[float, float]],
                 window: Optional[Tuple[float, float]] = None) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted
    once), clipped to ``window`` if given."""
    spans = sorted(intervals)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if window is not None:
            s, e = max(s, window[0]), min(e, window[1])
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _is_leaf_op(evt) -> bool:
    return evt.activity_type == 'cpu_op' and not any(
        c.activity_type == 'cpu_op' for c in evt.cpu_children)


def summarize(events, device: str = 'cuda',
              step_range: str = STEP_RANGE) -> Dict[str, float]:
    """Work items of one profiled step (see the module docstring).

    Args:
        events: ``prof.events()`` of a ``torch.profiler.profile``.
        device: ``'cuda'`` (device activities) or ``'cpu'`` (innermost
            operators).
        step_range: the ``record_function`` name that bounds the step; the
            whole trace if absent.

    Returns:
        ``kernels`` (kernels on CUDA, innermost operators on the CPU),
        ``copies`` (CUDA memcpy/memset, 0 on the CPU), ``busy_ms``,
        ``wall_ms`` and ``busy_fraction``, and ``top`` (the five names with
        the most time, ``[(name, ms, count)]``).
    """
    events = list(events)
    window = None
    for e in events:
        if e.name == step_range and e.activity_type == 'user_annotation':
            window = (e.time_range.start, e.time_range.end)
            break
    if device == 'cpu':
        work = [e for e in events if _is_leaf_op(e)]
    else:
        work = [e for e in events if e.activity_type in _DEVICE_WORK]
    if window is not None:
        work = [e for e in work if e.time_range.end > window[0]
                and e.time_range.start < window[1]]
    kernels = sum(1 for e in work
                  if device == 'cpu' or e.activity_type == 'kernel')
    copies = len(work) - kernels
    spans = [(e.time_range.start, e.time_range.end) for e in work]
    if window is None:
        window = (min((s for s, _ in spans), default=0.0),
                  max((e for _, e in spans), default=0.0))
    wall = window[1] - window[0]
    busy = union_length(spans, window)
    per_name: Dict[str, List[float]] = {}
    for e in work:
        item = per_name.setdefault(e.name, [0.0, 0])
        item[0] += e.time_range.end - e.time_range.start
        item[1] += 1
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:5]
    return dict(kernels=kernels, copies=copies, busy_ms=busy / 1e3,
                wall_ms=wall / 1e3,
                busy_fraction=busy / wall if wall > 0 else 0.0,
                top=[(n, round(t / 1e3, 3), int(c)) for n, (t, c) in top])


def profile_step(step: Callable[[], None], sync: Callable[[], None],
                 device: str = 'cuda') -> Dict[str, float]:
    """Profile one ``step()`` (followed by ``sync()``) and
    :func:`summarize` it."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU]
    if device == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    sync()
    with profile(activities=activities) as prof:
        with record_function(STEP_RANGE):
            step()
            sync()
    return summarize(prof.events(), device)
