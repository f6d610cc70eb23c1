"""A DDP wrapper for CPU (gloo) runs.

mmengine's ``Runner.wrap_model`` always passes ``device_ids=[LOCAL_RANK]`` to DistributedDataParallel subclasses,
which torch rejects for a CPU module. ``tools/train.py`` selects this wrapper (``model_wrapper_cfg``) when it runs
distributed without CUDA; on GPUs the stock ``MMDistributedDataParallel`` is used unchanged.
"""
from __future__ import annotations

from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

__all__ = ['CPUDistributedDataParallel']


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that ignores ``device_ids``/``output_device`` (CPU modules must not set them)."""

    def __init__(self, module, detect_anomalous_params: bool = False, **kwargs):
        kwargs.pop('device_ids', None)
        kwargs.pop('output_device', None)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)
