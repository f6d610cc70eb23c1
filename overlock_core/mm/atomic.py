"""Atomic checkpoint writes for mmengine's Runner.

mmengine 0.10.7 writes ``epoch_N.pth``/``iter_N.pth`` in place, so a kill during saving leaves a truncated file that
``--resume`` (which picks the newest) then fails on. Local paths are routed through
:func:`overlock_core.checkpoint.save_atomic` (temp file, fsync, rename); remote backends keep mmengine's own path.

Importing this module changes nothing in mmengine; :func:`install` (called by
:func:`overlock_core.mm.install_runner_patches`) swaps the function in.
"""
import os

import mmengine.runner.checkpoint as mm_checkpoint
import mmengine.runner.runner as mm_runner

from ..checkpoint import save_atomic

__all__ = ['atomic_save_checkpoint', 'install', 'installed']

_original = mm_checkpoint.save_checkpoint  # mmengine's own function (the module is imported before any install)


def atomic_save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
    """``mmengine.runner.checkpoint.save_checkpoint`` with local files written atomically."""
    name = os.fspath(filename)
    if file_client_args is None and backend_args is None and '://' not in name:
        save_atomic(checkpoint, name)
        return
    _original(checkpoint, filename, file_client_args=file_client_args, backend_args=backend_args)


def install() -> None:
    """Make mmengine's checkpoint module and the Runner (which imported the name) save atomically. Idempotent."""
    mm_checkpoint.save_checkpoint = atomic_save_checkpoint
    mm_runner.save_checkpoint = atomic_save_checkpoint


def installed() -> bool:
    """Whether the Runner's checkpoint writes currently go through :func:`atomic_save_checkpoint`."""
    return mm_runner.save_checkpoint is atomic_save_checkpoint is mm_checkpoint.save_checkpoint
