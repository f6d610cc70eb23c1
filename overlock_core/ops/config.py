"""Which kernels the operators may use: one process-wide object, ``KERNELS``, read by ``ops`` at each call.

Its fields start from the environment, so a shell or a launcher can set them for a whole run, and change with
``configure(...)``, or for a block of code with ``using(...)``. Every choice is between exact implementations (the
tests compare them); only speed differs.

=================  ==========================  ========================================================================
field              environment                 meaning
=================  ==========================  ========================================================================
``cpu_ext``        ``OVERLOCK_CPU_EXT=0``      the fused C++ ContMix aggregation on CPUs (else the PyTorch formulation)
``triton_av``      ``OVERLOCK_TRITON=0``       the Triton ContMix aggregation kernels on CUDA
``triton_dwconv``  ``OVERLOCK_TRITON_DWCONV``  the Triton depth-wise convolutions on CUDA: None (unset) where the
                   ``=1`` / ``=0``             measured table says they beat cuDNN, True or False for every supported
                                               convolution
``triton_drb``     ``OVERLOCK_TRITON_DRB``     a DilatedReparamBlock's branches in one Triton launch per pass on CUDA
                   ``=1`` / ``=0``             (the lean training form): None where the measured table says it beats a
                                               launch per branch, True or False everywhere
=================  ==========================  ========================================================================
"""
import contextlib
import dataclasses
import os
from typing import Iterator, Mapping, Optional

__all__ = ['KERNELS', 'KernelConfig', 'configure', 'using']


@dataclasses.dataclass
class KernelConfig:
    cpu_ext: bool = True
    triton_av: bool = True
    triton_dwconv: Optional[bool] = None
    triton_drb: Optional[bool] = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> 'KernelConfig':
        switch = {'1': True, '0': False}
        return cls(cpu_ext=env.get('OVERLOCK_CPU_EXT', '1') != '0', triton_av=env.get('OVERLOCK_TRITON', '1') != '0',
                   triton_dwconv=switch.get(env.get('OVERLOCK_TRITON_DWCONV')),
                   triton_drb=switch.get(env.get('OVERLOCK_TRITON_DRB')))


KERNELS = KernelConfig.from_env()


def configure(**changes) -> None:
    """Set fields of ``KERNELS`` for the rest of the process; an unknown field is an error."""
    known = {f.name for f in dataclasses.fields(KernelConfig)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f'unknown kernel option(s) {sorted(unknown)}; known: {sorted(known)}')
    for name, value in changes.items():
        setattr(KERNELS, name, value)


@contextlib.contextmanager
def using(**changes) -> Iterator[KernelConfig]:
    """``configure(**changes)`` inside the block, the previous values restored after it."""
    before = dataclasses.replace(KERNELS)
    configure(**changes)
    try:
        yield KERNELS
    finally:
        configure(**dataclasses.asdict(before))
