"""The mmengine checkpoint allow-list for the OpenMMLab launchers (defined in :mod:`overlock_core.safe_globals`)."""
from ..safe_globals import (allow_mmengine_checkpoints, mmengine_checkpoint_globals, mmengine_checkpoints_allowed,
                            mmengine_safe_globals)

MMENGINE_SAFE_GLOBALS = mmengine_safe_globals()

__all__ = ['MMENGINE_SAFE_GLOBALS', 'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
           'mmengine_checkpoints_allowed']
