import os

# One thread per process: tests start several processes (DDP ranks, launchers) on a 2-core machine, and OpenMP
# threads that oversubscribe the cores make torch far slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
