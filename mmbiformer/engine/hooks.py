"""Training hooks registered in mmengine's root ``HOOKS`` registry (usable
from every toolbox's configs as ``custom_hooks=[dict(type=...)]``).

:class:`RNGStateHook` makes ``--resume`` continue a run exactly.

mmengine's resume restores the weights, the optimizer, the schedulers and
the iteration count, re-seeds every generator with the run's seed, and (for
iteration-based loops) replays the data loader up to the resumed iteration.
What it cannot bring back is the state the random generators had reached
when the checkpoint was written: drop path, dropout and the batch
augmentations (Mixup/CutMix) draw from torch's generator in the training
process, so after a resume they draw different numbers than the
uninterrupted run would have, and the two runs drift apart.

The hook stores, with every checkpoint, the generator states of every rank
(torch CPU, CUDA when present, numpy and Python's ``random``; gathered to
rank 0 after every training iteration, a few kB per rank) and puts them
back when training restarts:

* iteration-based loops (mmseg): the torch/CUDA states just before the first
  resumed iteration, after mmengine has replayed the data loader (the replay
  itself re-creates the data augmentation's numpy/``random`` draws, so those
  are left as the replay leaves them);
* epoch-based loops (mmpretrain, mmdet): all states at the start of the
  resumed epoch, which is where the checkpoint was taken.

With data loader workers, augmentation randomness lives in the workers and is
seeded by mmengine per worker; a fresh worker then repeats what the
interrupted one would have drawn when workers are re-created every epoch or
when the loop replays the loader (iteration-based). Persistent workers of an
epoch-based loop continue their stream across epochs, which no checkpoint
can capture: there the resumed run's augmentations differ (training stays
valid; only the bitwise equality with the uninterrupted run is lost).
"""
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from mmengine.dist import (
    all_gather_object,
    all_reduce_params,
    get_rank,
    get_world_size,
)
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

#: checkpoint key holding the per-rank states
CKPT_KEY = 'rng_states'


def capture_rng_state() -> Dict:
    """This process's generator states as plain Python objects and tensors
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = dict(
        torch=torch.get_rng_state(),
        numpy=(kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               int(pos), int(has_gauss), float(gauss)),
        python=(version, list(internal), gauss_next))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict, parts=('torch', 'cuda', 'numpy',
                                          'python')) -> List[str]:
    """Put back the ``parts`` of a :func:`capture_rng_state` result; returns
    the parts restored."""
    done = []
    if 'torch' in parts and 'torch' in state:
        torch.set_rng_state(state['torch'])
        done.append('torch')
    if 'cuda' in parts and 'cuda' in state and torch.cuda.is_available():
        cuda = state['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
            done.append('cuda')
    if 'numpy' in parts and 'numpy' in state:
        kind, keys, pos, has_gauss, gauss = state['numpy']
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos,
                             has_gauss, gauss))
        done.append('numpy')
    if 'python' in parts and 'python' in state:
        version, internal, gauss_next = state['python']
        random.setstate((version, tuple(internal), gauss_next))
        done.append('python')
    return done


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the random generator states of every rank with each checkpoint
    and restore them on ``--resume`` (see the module docstring).

    ``tools/train.py`` adds this hook to every run; in other tools, add it
    with ``custom_hooks=[dict(type='RNGStateHook')]``.
    """
    # before CheckpointHook (VERY_LOW) in after_train_iter
    priority = 'LOW'

    def __init__(self) -> None:
        self._pending: Optional[Dict] = None
        self._latest: Optional[List[Dict]] = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        # Every rank's states after each iteration, where a checkpoint may
        # follow: mmengine writes checkpoints on rank 0 only (its
        # before_save_checkpoint runs there alone), so the other ranks'
        # states are gathered here, one small all-gather per iteration.
        state = capture_rng_state()
        self._latest = all_gather_object(state) if get_world_size() > 1 \
            else [state]

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._latest is None:  # e.g. a checkpoint before any iteration
            self._latest = [capture_rng_state()]
        checkpoint[CKPT_KEY] = self._latest

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # mmengine calls this when resuming only (not for load_from)
        states = checkpoint.get(CKPT_KEY)
        if not states:
            print_log(
                'RNGStateHook: the checkpoint holds no generator states '
                '(written without this hook); the resumed run draws '
                'from freshly seeded generators', logger='current')
            return
        if len(states) != get_world_size():
            print_log(
                f'RNGStateHook: the checkpoint was written by '
                f'{len(states)} process(es), this run has '
                f'{get_world_size()}; generator states not restored',
                logger='current', level=30)
            return
        self._pending = states[get_rank()]

    def _restore_pending(self, parts) -> None:
        done = restore_rng_state(self._pending, parts)
        self._pending = None
        print_log(f'RNGStateHook: restored the {"/".join(done)} generator '
                  'states of the checkpoint', logger='current')

    def before_train_epoch(self, runner) -> None:
        if self._pending is not None and _epoch_based(runner):
            self._restore_pending(('torch', 'cuda', 'numpy', 'python'))

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        if self._pending is not None:
            # iteration-based: after the data loader replay (numpy/random
            # are where the replay leaves them, as in the uninterrupted run)
            self._restore_pending(('torch', 'cuda'))


def _epoch_based(runner) -> bool:
    from mmengine.runner import EpochBasedTrainLoop
    return isinstance(runner.train_loop, EpochBasedTrainLoop)


@HOOKS.register_module()
class SyncNormStatsHook(Hook):
    """Average the floating-point buffers (BatchNorm running statistics)
    over the ranks every ``interval`` training iterations and after the
    last one.

    DistributedDataParallel keeps the parameters of all ranks identical,
    but each rank's BatchNorm layers update their running statistics from
    that rank's batch only. On GPUs the configs' SyncBN computes them over
    the global batch; without CUDA (gloo, where SyncBN cannot run and
    becomes BN) ``tools/train.py`` adds this hook instead, so that all ranks
    hold the same statistics, close to SyncBN's (the average of the ranks'
    means is the global mean for equal batches), before every checkpoint.
    """
    priority = 'LOW'  # before CheckpointHook (VERY_LOW)

    def __init__(self, interval: int = 1) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be a positive int, got '
                             f'{interval!r}')
        self.interval = interval

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if get_world_size() < 2:
            return
        if not (self.every_n_train_iters(runner, self.interval)
                or self.is_last_train_iter(runner)):
            return
        buffers = [b for b in runner.model.buffers() if b.is_floating_point()]
        if buffers:
            all_reduce_params(buffers, op='mean')
