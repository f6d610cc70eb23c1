"""Let mmengine's own checkpoints load under ``torch.load(weights_only=True)``.

mmengine 0.10.7 calls ``torch.load(filename, map_location=...)`` without ``weights_only``. Since torch 2.6 that
means ``weights_only=True``: the restricted unpickler refuses every global that is not on torch's allow-list,
and a training checkpoint written by mmengine's ``CheckpointHook`` holds a few such globals (the
``MessageHub`` state with ``HistoryBuffer`` objects and the numpy arrays/scalars inside them). ``--resume``
therefore fails with ``UnpicklingError: Weights only load failed``.

The fix here is deliberately narrow: the exact globals that mmengine's checkpoints contain (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on real mmdet/mmseg training checkpoints, then by resuming
them) are added with :func:`torch.serialization.add_safe_globals`:

* ``mmengine.logging.history_buffer.HistoryBuffer``
* ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.dtypes.Float64DType``
  (the buffers' float64 arrays)
* ``numpy.core.multiarray.scalar``, ``numpy.dtypes.Int64DType`` (numpy scalars among the logged values)
* ``builtins.getattr`` -- served by :func:`_history_buffer_getattr`, a stand-in that only resolves
  ``HistoryBuffer.{min,max,current,mean}`` (a HistoryBuffer pickles its statistics functions that way); the real
  ``getattr`` is never allow-listed.

Nothing passes ``weights_only=False``, so a pickle that would execute code (``os.system``, ``eval``, ...) is still
refused.

Imported (and applied) by ``overlock_core.mm``.
"""
from __future__ import annotations

import pickle
from typing import Any, List

import numpy as np
import torch

__all__ = ['MMENGINE_SAFE_GLOBALS', 'allow_mmengine_checkpoints']


def _numpy_globals() -> List[Any]:
    """numpy objects inside ``HistoryBuffer`` (float64 arrays) and numpy scalars among the logged values."""
    try:
        from numpy.core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 2 without the numpy.core shim
        from numpy._core.multiarray import _reconstruct, scalar
    out: List[Any] = [_reconstruct, scalar, np.ndarray, np.dtype]
    # numpy >= 1.25 rebuilds a pickled dtype through its concrete class (BUILD on numpy.dtypes.Float64DType, ...):
    # float64 = HistoryBuffer arrays; int64 = numpy integer scalars among the logged values.
    dtypes_mod = getattr(np, 'dtypes', None)
    for name in ('Float64DType', 'Int64DType'):
        cls = getattr(dtypes_mod, name, None) if dtypes_mod is not None else None
        if cls is not None:
            out.append(cls)
    return out


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """A ``getattr`` that only resolves ``HistoryBuffer.<statistics method>``.

    A ``HistoryBuffer`` pickles its ``statistics_methods`` dict of plain functions (``HistoryBuffer.mean`` ...);
    pickle protocol 2 (torch.save's default) writes each as ``getattr(HistoryBuffer, 'mean')``. Allow-listing the
    real builtin ``getattr`` would let a checkpoint fetch arbitrary attributes of any allowed object, so this
    stand-in is registered under the name ``builtins.getattr`` instead and refuses everything else.
    """
    from mmengine.logging.history_buffer import HistoryBuffer
    allowed = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed and hasattr(HistoryBuffer, name):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: only '
                                 'HistoryBuffer statistics methods are allowed')


def _mmengine_globals() -> List[Any]:
    from mmengine.logging.history_buffer import HistoryBuffer
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')]


MMENGINE_SAFE_GLOBALS: List[Any] = []


def allow_mmengine_checkpoints() -> List[Any]:
    """Add the allow-list once; returns it. Idempotent."""
    if not MMENGINE_SAFE_GLOBALS:
        MMENGINE_SAFE_GLOBALS.extend(_mmengine_globals() + _numpy_globals())
        add = getattr(torch.serialization, 'add_safe_globals', None)
        if add is not None:  # torch < 2.4 has no weights_only default, nothing to do
            add(list(MMENGINE_SAFE_GLOBALS))
    return MMENGINE_SAFE_GLOBALS
