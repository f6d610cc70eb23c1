"""Atomic checkpoint writes for mmengine's Runner.

mmengine 0.10.7 writes ``epoch_N.pth``/``iter_N.pth`` in place, so a kill during saving leaves a truncated file that
``--resume`` (which picks the newest) then fails on. Local paths are routed through
:func:`overlock_core.checkpoint.save_atomic` (temp file, fsync, rename); remote backends keep mmengine's own path.
"""
import os

import mmengine.runner.checkpoint as mm_checkpoint
import mmengine.runner.runner as mm_runner

from ..checkpoint import save_atomic

_original = mm_checkpoint.save_checkpoint


def atomic_save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
    name = os.fspath(filename)
    if file_client_args is None and backend_args is None and '://' not in name:
        save_atomic(checkpoint, name)
        return
    _original(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)


def install() -> None:
    mm_checkpoint.save_checkpoint = atomic_save_checkpoint
    mm_runner.save_checkpoint = atomic_save_checkpoint
