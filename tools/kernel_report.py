"""The Triton kernels as a GPU would build them, on a machine without one.

Each kernel is compiled for a CUDA architecture (Triton ships ptxas) from the arguments its launch function passes
for OverLoCK-T's shapes at 224 (recorded on CPU tensors), specialised as Triton's JIT specialises them at run time:
integers equal to 1 become constants, 16-divisible integers and pointers are marked aligned. cuobjdump then reads
back, per launch, the registers per thread, the local memory (register spills) and the global loads and stores of
the compiled code by width: on channels-last maps a 128-bit load moves 8 bf16 channels at once, a 16-bit one a
single value.

    python tools/kernel_report.py [--arch 90] [--dtype bf16] [--json kernels.json]

A static view of how the code is built, not of how fast it runs: timings need a GPU
(``tools/benchmark.py --device cuda --ops dwconv``).
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overlock_core.models.layers import DRB_BRANCHES  # noqa: E402
from overlock_core.ops import triton_av, triton_dwconv  # noqa: E402

KERNELS = ((triton_dwconv, ('_taps_kernel', '_taps_wgrad_kernel')),
           (triton_av, ('_fwd_kernel', '_grad_attn_kernel', '_grad_value_kernel')))
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


class _Recorder:
    """Stands in for a Triton kernel: a launch appends (kernel, args, kwargs) to ``launched`` instead of running."""

    def __init__(self, fn, launched: List):
        self.fn, self.launched = fn, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((self.fn, args, kwargs))


@contextlib.contextmanager
def recording() -> Iterator[List[Tuple]]:
    """Within the block, the launch functions record their kernel launches instead of running them: yields the
    list of (kernel, args, kwargs), in launch order."""
    launched, saved = [], []
    for module, names in KERNELS:
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), launched))
    try:
        yield launched
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def compile_launch(fn, args, kwargs, arch: int) -> Dict:
    """{'usage': cuobjdump's resource usage ({'REG': registers per thread, 'LOCAL': spill bytes, ...}), 'memory':
    global load/store instructions by kind, 'sass'} of ``fn`` launched with these arguments, compiled for sm_<arch>
    as the JIT would compile it. 'usage' and 'memory' are empty without Triton's cuobjdump."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    cubin = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                           options=options.__dict__).asm['cubin']
    tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
    if not os.path.isfile(tool):
        return dict(usage={}, memory={}, sass='')
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{fn.__name__}.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        res = subprocess.run([tool, '-res-usage', path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, '-sass', path], capture_output=True, text=True, check=True).stdout
    line = next(line for line in res.splitlines() if 'REG:' in line)
    usage = {k: int(v) for k, v in re.findall(r'(\w+(?:\[\d+\])?):(\d+)', line)}
    memory = dict(sorted(Counter(re.findall(r'\b((?:LDG|STG)\.E[.\w]*)', sass)).items()))
    return dict(usage=usage, memory=memory, sass=sass)


def launches(dtype: torch.dtype) -> List[Tuple[str, str, object, tuple, dict]]:
    """(label, layout, kernel, args, kwargs) of each kernel launch of OverLoCK-T's third stage at 224 (batch 2): the
    13x13 depth-wise convolution (forward with bias, weight gradient) and its DilatedReparamBlock branches' summed
    input gradient, on channels-last and NCHW maps; ContMix's aggregation (13x13 windows on the 14x14 map, 7x7 on
    the 7x7 map of the last stage), in ContMix's layout."""
    branches = ((13, 1),) + DRB_BRANCHES[13]
    weights = [torch.randn(256, 1, k, k, dtype=dtype) for k, _ in branches]
    labels = []
    with recording() as launched:
        for layout, fmt in (('channels-last', torch.channels_last), ('NCHW', torch.contiguous_format)):
            x = torch.randn(2, 256, 14, 14, dtype=dtype).contiguous(memory_format=fmt)
            triton_dwconv.dwconv_forward(x, weights[0], torch.randn(256, dtype=dtype), 1)
            triton_dwconv.branches_input_grad(triton_dwconv._stacked(x, len(branches)).normal_(), weights,
                                              [d for _, d in branches])
            triton_dwconv.dwconv_weight_grad(x, torch.randn_like(x), 13, 1)
            labels += [(name, layout) for name in ('dwconv forward 13x13', 'DRB 13 input gradient (branches summed)',
                                                   'dwconv weight gradient 13x13')]
        for ks, hw in ((13, 14), (7, 7)):
            attn = torch.randn(16, hw, hw, ks * ks, dtype=dtype).permute(0, 3, 1, 2)  # ContMix's (N, H, W, K*K)
            value = torch.randn(16, 32, hw, hw, dtype=dtype)
            triton_av.av_forward(attn, value, ks)
            triton_av.av_backward((attn, value), torch.randn_like(value), ks, (True, True))
            labels += [(f'aggregation {ks}x{ks} {p}', 'ContMix') for p in ('forward', 'grad attn', 'grad value')]
    assert len(launched) == len(labels), 'a launch function launched more or fewer kernels than listed'
    return [label + call for label, call in zip(labels, launched)]


def report(arch: int, dtype: torch.dtype) -> List[Dict]:
    """One row per launch of ``launches(dtype)``, compiled for sm_<arch>."""
    rows = []
    for label, layout, fn, args, kwargs in launches(dtype):
        built = compile_launch(fn, args, kwargs, arch)
        rows.append(dict(kernel=label, layout=layout, triton_fn=fn.__name__, arch=arch,
                         registers=built['usage'].get('REG'), spill_bytes=built['usage'].get('LOCAL'),
                         memory=built['memory']))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--arch', type=int, default=90, help='CUDA compute capability x 10: 90 H100/H200, 80 A100')
    ap.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    ap.add_argument('--json', help='also write the rows to this file')
    args = ap.parse_args()
    if triton_dwconv.triton is None:
        sys.exit('kernel_report.py needs Triton (pip install triton)')
    if triton_dwconv.INTERPRETED:
        sys.exit('kernel_report.py: unset TRITON_INTERPRET (the kernels must be defined for compilation)')
    rows = report(args.arch, DTYPES[args.dtype])
    print(f'Triton kernels for sm_{args.arch}, {args.dtype}, from the launches of OverLoCK-T at 224 (stage 3)')
    print('| kernel | layout | registers | spill bytes | global loads and stores in the code |')
    print('|---|---|---:|---:|---|')
    for r in rows:
        mem = ', '.join(f'{k} x{v}' for k, v in r['memory'].items())
        print(f"| {r['kernel']} | {r['layout']} | {r['registers']} | {r['spill_bytes']} | {mem} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
