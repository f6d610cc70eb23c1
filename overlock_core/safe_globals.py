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

Importing this module changes nothing in torch. Two ways to use the list:

* :func:`allow_mmengine_checkpoints` adds it to torch's process-wide allow-list; launchers call it through
  :func:`overlock_core.mm.install_runner_patches`, because mmengine's Runner loads checkpoints deep inside ``resume``;
* ``with mmengine_checkpoint_globals(): torch.load(path, weights_only=True)`` allows it for one block only (what
  :func:`overlock_core.checkpoint.load_checkpoint_file` does).
"""
from __future__ import annotations

import contextlib
import functools
import pickle
from typing import Any, Iterator, List

import numpy as np
import torch

__all__ = ['mmengine_safe_globals', 'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
           'mmengine_checkpoints_allowed']


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


@functools.lru_cache(maxsize=None)
def mmengine_safe_globals() -> List[Any]:
    """The list (empty without mmengine, whose checkpoints are then not met)."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return []
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')] + _numpy_globals()


def _missing() -> List[Any]:
    """The entries of the list that torch's allow-list does not hold yet."""
    present = set(torch.serialization.get_safe_globals())
    return [g for g in mmengine_safe_globals() if g not in present]


def mmengine_checkpoints_allowed() -> bool:
    """Whether torch's process-wide allow-list holds the whole list."""
    return not _missing()


def allow_mmengine_checkpoints() -> List[Any]:
    """Add the list to torch's process-wide ``weights_only`` allow-list; returns it. Idempotent.

    Process-wide so that mmengine's own ``torch.load`` calls (``--resume``, ``load_from``) see it.
    """
    torch.serialization.add_safe_globals(_missing())
    return mmengine_safe_globals()


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[List[Any]]:
    """Allow the list inside a ``with`` block only; entries that were allowed before stay allowed after it.

    For loading one mmengine checkpoint without changing torch's allow-list for the rest of the process.
    """
    with torch.serialization.safe_globals(_missing()):  # on exit removes exactly what it added
        yield mmengine_safe_globals()
