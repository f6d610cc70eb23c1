"""Stop a run at the first non-finite loss, before anything is saved from the broken weights."""
import glob
import math
import os

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Raises at once when the training loss is NaN/inf, naming the iteration and the last good checkpoint.

    Runs at the highest priority, so the CheckpointHook of the same iteration never writes the broken weights.
    ``tools/train.py`` adds it to every run.
    """
    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = (outputs or {}).get('loss')
        if loss is None:
            return
        value = float(loss.detach().float().sum()) if hasattr(loss, 'detach') else float(loss)
        if math.isfinite(value):
            return
        ckpts = sorted(glob.glob(os.path.join(runner.work_dir, '*.pth')), key=os.path.getmtime)
        last = ckpts[-1] if ckpts else 'none yet'
        raise RuntimeError(f'non-finite loss ({value}) at iteration {runner.iter + 1} (epoch {runner.epoch + 1}); '
                           f'stopping before anything is saved. Last good checkpoint: {last}. '
                           f'Resume from it with --resume, e.g. with a lower lr or without --amp.')
