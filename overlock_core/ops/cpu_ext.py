"""The fused CPU kernels of ``overlock_core/csrc`` (ContMix's ``kernel_av``), built on first use with torch's C++
extension tools and cached per machine, so later processes only load them.

The build happens once per source version, torch version and CPU (the code is compiled for the CPU it runs on, so a
cache shared by different nodes keeps one build per kind of CPU) in ``$OVERLOCK_CACHE/ext`` (default
``~/.cache/overlock/ext``); ``make setup`` does it up front (``build``). ``KERNELS.cpu_ext`` (``ops.config``;
``OVERLOCK_CPU_EXT=0``) switches the kernels off. Without a C++ compiler, or if the build fails, the PyTorch formulation
runs instead, after one warning naming the build log.
"""
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

from .config import KERNELS

__all__ = ['build', 'enabled', 'get', 'load']

SOURCE = Path(__file__).resolve().parent.parent / 'csrc' / 'kernel_av.cpp'
# -fno-trapping-math lets the compiler vectorise the softmax's exp (no result changes); -march=native: this CPU's
# vector width (the build is keyed by the CPU, see _key)
CFLAGS = ['-O3', '-fno-trapping-math', '-fopenmp', '-std=c++20', '-march=native']


def enabled() -> bool:
    return KERNELS.cpu_ext


def get() -> Optional[object]:
    """The compiled module if the kernels are switched on (read each call) and build, else None."""
    return load() if enabled() else None


def _cpu() -> str:
    """What the build depends on beyond the sources: the CPU's model and instruction-set flags."""
    try:
        info = Path('/proc/cpuinfo').read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(('model name', 'flags', 'Features'))]
        return platform.machine() + '\n'.join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _key() -> str:
    import torch
    text = SOURCE.read_bytes() + ' '.join(CFLAGS + [torch.__version__, _cpu()]).encode()
    return hashlib.sha1(text).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False) -> Optional[object]:
    """The compiled module (``forward``, ``backward``), built if needed (once per process); None if it cannot be."""
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns that no CUDA toolkit is found: irrelevant to a CPU build
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    venv_bin = os.path.dirname(sys.executable)  # the ninja that set-up installed, in a venv not activated
    if shutil.which('ninja') is None and shutil.which('ninja', path=venv_bin):
        os.environ['PATH'] = venv_bin + os.pathsep + os.environ.get('PATH', '')
    key = _key()
    root = Path(os.environ.get('OVERLOCK_CACHE', Path.home() / '.cache' / 'overlock')) / 'ext' / key
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not any(root.glob('*.so')):
            print(f'overlock: building the fused CPU kernels once (~30 s) in {root}', file=sys.stderr)
        return cpp_extension.load(f'overlock_cpu_{key}', [str(SOURCE)], extra_cflags=CFLAGS,
                                  extra_ldflags=['-fopenmp'], build_directory=str(root), verbose=verbose)
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch formulation still runs
        warnings.warn(f'overlock: the fused CPU kernels could not be built ({type(e).__name__}: '
                      f'{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""}); ContMix runs its PyTorch '
                      f'formulation instead (slower, same results). Build directory: {root}')
        return None


def build() -> bool:
    """Build (or find) the kernels now and say so: ``make setup`` calls this, so the first training step does not
    pay for the build."""
    ok = enabled() and load() is not None
    print(f'[setup] fused CPU kernels: {"ready" if ok else "not built (ContMix runs its PyTorch formulation)"}')
    return ok
