"""Skip markers shared by the Triton kernel tests (the kernels run on CUDA, or on the CPU through the interpreter)."""
import numpy as np
import pytest
import torch

from overlock_core.ops import triton_av


def _version(text):
    return tuple(int(p) for p in text.split('+')[0].split('.')[:2])


TRITON = triton_av.triton  # None when Triton is not installed
needs_triton = pytest.mark.skipif(TRITON is None, reason='Triton is not installed')
# Triton 3.6's interpreter turns every loop bound into a 1-element numpy array, which numpy >= 2.4 refuses to
# convert (e.g. Triton 3.6.0 with numpy 2.5.2); Triton 3.8 with either numpy works.
OLD_INTERPRETER = TRITON is not None and _version(TRITON.__version__) < (3, 8) and _version(np.__version__) >= (2, 4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or TRITON is None, reason='needs a CUDA GPU and Triton')
