"""OpenMMLab adapter for OverLoCK (mmengine only; needs neither mmdet nor mmseg to import).

Importing this package

* registers ``OverLoCKBackbone`` in ``mmengine.registry.MODELS`` (the root registry, so both ``default_scope='mmdet'``
  and ``default_scope='mmseg'`` configs build it),
* registers ``OverLoCKOptimWrapperConstructor`` in ``mmengine.registry.OPTIM_WRAPPER_CONSTRUCTORS``,
* registers ``CPUDistributedDataParallel`` in ``mmengine.registry.MODEL_WRAPPERS`` (gloo runs on CPU machines),
* makes the Runner's checkpoint writes atomic (:mod:`overlock_core.mm.atomic`),
* adds the few classes mmengine's own checkpoints contain to torch's ``weights_only`` allow-list
  (:mod:`overlock_core.mm.safe_load`), so ``--resume`` works under torch >= 2.6 without ``weights_only=False``.

Configs use ``custom_imports = dict(imports=['overlock_core.mm'], allow_failed_imports=False)``.
"""
from .safe_load import MMENGINE_SAFE_GLOBALS, allow_mmengine_checkpoints

allow_mmengine_checkpoints()

from .atomic import install as _install_atomic_saving  # noqa: E402

_install_atomic_saving()  # Runner checkpoints: temp file + rename, never a truncated epoch_N.pth

from .backbone import OverLoCKBackbone  # noqa: E402
from .dist import CPUDistributedDataParallel  # noqa: E402
from .hooks import NonFiniteLossHook  # noqa: E402
from .optim import OverLoCKOptimWrapperConstructor  # noqa: E402

__all__ = ['OverLoCKBackbone', 'NonFiniteLossHook', 'OverLoCKOptimWrapperConstructor', 'CPUDistributedDataParallel',
           'MMENGINE_SAFE_GLOBALS', 'allow_mmengine_checkpoints']
