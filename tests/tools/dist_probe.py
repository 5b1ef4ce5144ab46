"""A test-only hook for the distributed tests: dumps each rank's model
state and can make one rank crash (imported by the runs through
``custom_imports``; ``tests/tools`` is put on their ``PYTHONPATH``)."""
import os
import os.path as osp
import signal

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankProbeHook(Hook):
    """``dump_dir``: write ``{init,final}_rank<r>.pth`` (parameters and
    buffers) before and after training; ``crash_rank``/``crash_iter``: that
    rank fails after that training iteration, by an exception
    (``crash_mode='raise'``) or by SIGKILL (``'kill'``)."""

    def __init__(self, dump_dir=None, crash_rank=None, crash_iter=None,
                 crash_mode='raise'):
        self.dump_dir = dump_dir
        self.crash_rank = crash_rank
        self.crash_iter = crash_iter
        self.crash_mode = crash_mode

    def _dump(self, runner, tag):
        if self.dump_dir is None:
            return
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        os.makedirs(self.dump_dir, exist_ok=True)
        state = {k: v.detach().clone() for k, v in
                 model.state_dict().items()}
        torch.save(state, osp.join(self.dump_dir,
                                   f'{tag}_rank{get_rank()}.pth'))

    def before_train(self, runner):
        self._dump(runner, 'init')

    def after_train(self, runner):
        self._dump(runner, 'final')

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if get_rank() != self.crash_rank or \
                runner.iter + 1 != self.crash_iter:
            return
        print(f'RankProbeHook: rank {get_rank()} crashes after iteration '
              f'{self.crash_iter} ({self.crash_mode})', flush=True)
        if self.crash_mode == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError('RankProbeHook: simulated crash')
