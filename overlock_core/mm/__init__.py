"""OpenMMLab adapter for OverLoCK (mmengine only; needs neither mmdet nor mmseg to import).

Importing this package only registers modules:

* ``OverLoCKBackbone`` in ``mmengine.registry.MODELS`` (the root registry, so both ``default_scope='mmdet'``
  and ``default_scope='mmseg'`` configs build it),
* ``OverLoCKOptimWrapperConstructor`` in ``mmengine.registry.OPTIM_WRAPPER_CONSTRUCTORS``,
* ``CPUDistributedDataParallel`` in ``mmengine.registry.MODEL_WRAPPERS`` (gloo runs on CPU machines),
* ``NonFiniteLossHook`` in ``mmengine.registry.HOOKS``.

Configs use ``custom_imports = dict(imports=['overlock_core.mm', ...], allow_failed_imports=False)``.

Launchers (``tools/train.py``, ``tools/test.py``, or your own) call :func:`install_runner_patches` once before
building the Runner; it changes mmengine and torch for the rest of the process, so importing never does it:

* the Runner's checkpoint writes become atomic (:mod:`overlock_core.mm.atomic`),
* the few classes mmengine's own checkpoints contain join torch's ``weights_only`` allow-list
  (:mod:`overlock_core.mm.safe_load`), so ``--resume`` works under torch >= 2.6 without ``weights_only=False``.
"""
from .backbone import OverLoCKBackbone
from .dist import CPUDistributedDataParallel
from .hooks import NonFiniteLossHook
from .optim import OverLoCKOptimWrapperConstructor
from .safe_load import MMENGINE_SAFE_GLOBALS, allow_mmengine_checkpoints, mmengine_checkpoint_globals

__all__ = ['OverLoCKBackbone', 'NonFiniteLossHook', 'OverLoCKOptimWrapperConstructor', 'CPUDistributedDataParallel',
           'MMENGINE_SAFE_GLOBALS', 'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
           'install_runner_patches', 'runner_patches_installed']


def install_runner_patches() -> None:
    """Atomic checkpoint saving and the mmengine-checkpoint ``weights_only`` allow-list, for this process.

    Call once in a launcher, before the Runner is built: both change other libraries, so importing never does it.
    Idempotent.
    """
    from . import atomic
    allow_mmengine_checkpoints()
    atomic.install()


def runner_patches_installed() -> bool:
    """Whether :func:`install_runner_patches` is in effect (checkpoints atomic and allow-list present)."""
    from . import atomic
    from .safe_load import mmengine_checkpoints_allowed
    return atomic.installed() and mmengine_checkpoints_allowed()
