"""Fused depth-wise 'same' convolutions in Triton for CUDA: forward, input gradient and weight gradient, of one
convolution or of a DilatedReparamBlock's parallel branches in one launch per pass.

OverLoCK's depth-wise convolutions (K x K kernels up to 17x17, dilated 3x3 to 9x9 re-parameterisation branches)
go through cuDNN's direct kernels, which are slow for wide kernels in all three passes. These kernels run the three
passes straight from the inputs, with fp32 accumulation whatever the input dtype. A convolution is given as a list
of taps, each an offset (di, dj) and a row of the packed (T, C) weights (``_tap_table``); a set of branches is
the concatenation of their lists:

* forward: a program takes a tile of pixels (TILE_H x TILE_W) of BLOCK_C channels of one image and, branch by
  branch, walks the taps, each a load of the shifted input tile (zero outside the map: 'same' padding
  d * (K - 1) / 2) times the tap's weights, and stores that branch's output (bias added for a single convolution);
* input gradient: the same kernel on the output gradients with the offsets negated (stride 1, 'same' padding: the
  transposed convolution is the convolution with the flipped kernel), every branch summed into one accumulator
  and stored once;
* weight gradient: a program takes BLOCK_C channels and a share of the (image, tile) pairs; per tap it sums
  grad * shifted input over its share and writes one fp32 partial sum per channel and tap; the shares are then
  summed by torch (deterministic, no atomics). The bias gradient is a plain torch sum.

A DilatedReparamBlock of OverLoCK-T has 5-7 convolutions: one launch per pass instead of one per convolution, the
input gradient written once instead of per convolution and added up (``branches_forward``, ``branches_input_grad``,
``branches_weight_grad``; used by the lean DilatedReparamBlock function, ``ops.recompute.bn_branch_sum``).

Strides are arguments, so NCHW and channels-last tensors (and strided views) run without a copy; the tile shape
follows the layout (wide channel blocks for channels-last, wide pixel rows for NCHW). Odd kernels 3 to 17,
dilation >= 1, stride 1; fp32, fp16, bf16 (and fp64 through the interpreter). With ``TRITON_INTERPRET=1`` set
before this module is imported, the kernels run on CPU tensors in Triton's interpreter, which is how the test suite
checks them, and the operators' dispatch to them, without a GPU.

Dispatch: cuDNN stays the default.

* ``use_triton`` (one convolution; ``dwconv.dw_conv2d``, its backward and the training-form functions):
  ``KERNELS.triton_dwconv`` (``ops.config``; ``OVERLOCK_TRITON_DWCONV=1``) forces these kernels for every supported
  convolution on CUDA, False (``=0``) forces cuDNN; otherwise ``MEASURED[(kernel, dilation, map_bucket(h, w), dtype
  name)]`` decides, and a missing entry means cuDNN.
* ``use_branches`` (a DilatedReparamBlock's branches together): ``KERNELS.triton_drb`` (``OVERLOCK_TRITON_DRB``) the
  same way, else ``MEASURED_DRB[(block kernel, map_bucket(h, w), dtype name)]``.

CPU tensors take them only in the interpreter, when the switch is True. The tables are filled from a GPU run of

    python tools/benchmark.py --device cuda --ops dwconv --json dwconv.json

which times cuDNN against these kernels (forward + both gradients) on the shapes OverLoCK meets, one convolution
at a time and each block's branches together, in fp16 and bf16, NCHW and channels-last, and prints the entries to
paste here: True where the kernels were faster in every layout measured for that key.
"""
import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .config import KERNELS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: cuDNN / PyTorch serve every convolution
    triton = None

__all__ = ['MEASURED', 'MEASURED_DRB', 'available', 'branches_forward', 'branches_input_grad',
           'branches_weight_grad', 'decide', 'decide_branches', 'dwconv_backward', 'dwconv_forward',
           'dwconv_input_grad', 'dwconv_weight_grad', 'map_bucket', 'supported', 'use_branches', 'use_triton']

DTYPE_NAMES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}
MAP_BUCKETS = (16, 32, 64, 128, 256)  # map_bucket: the side of the smallest of these squares holding the map
INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'  # read by Triton when the kernels below are defined

# (kernel, dilation, map bucket, dtype name) -> whether the Triton kernels beat cuDNN there (fwd + both grads).
# Empty until measured on a GPU (see the module docstring): cuDNN everywhere.
MEASURED: Dict[Tuple[int, int, int, str], bool] = {}
# (DilatedReparamBlock kernel, map bucket, dtype name) -> whether its branches in one launch per pass beat cuDNN's
# launch per branch (fwd + both grads). Empty until measured: per branch.
MEASURED_DRB: Dict[Tuple[int, int, str], bool] = {}


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can serve this tensor: Triton installed, not while torch.compile traces, and the tensor
    on CUDA (or on the CPU with the kernels in Triton's interpreter)."""
    if triton is None or torch.compiler.is_compiling():
        return False
    return t.is_cuda or (t.device.type == 'cpu' and INTERPRETED)


def supported(kernel_size: int, dilation: int) -> bool:
    """The convolutions the kernels implement: odd square kernels 3 to 17, any dilation, stride 1."""
    return kernel_size % 2 == 1 and 3 <= kernel_size <= 17 and dilation >= 1


def map_bucket(h: int, w: int) -> int:
    """The map-size key of ``MEASURED``: the side of the smallest square of ``MAP_BUCKETS`` with h * w pixels or
    more (0: larger than all)."""
    return next((s for s in MAP_BUCKETS if h * w <= s * s), 0)


def _switch(flag: Optional[bool], table: Dict, key: Tuple, dtype: torch.dtype) -> bool:
    """A forced choice (True: any dtype the kernels run, fp64 included) or the measured table's entry for key."""
    if flag is not None:
        return flag and (dtype in DTYPE_NAMES or dtype == torch.float64)
    return dtype in DTYPE_NAMES and table.get(key + (DTYPE_NAMES[dtype],), False)


def decide(kernel_size: int, dilation: int, hw: Tuple[int, int], dtype: torch.dtype) -> bool:
    """The dispatch rule without the device checks: ``KERNELS.triton_dwconv`` if set, else the measured table."""
    if not supported(kernel_size, dilation):
        return False
    return _switch(KERNELS.triton_dwconv, MEASURED, (kernel_size, dilation, map_bucket(*hw)), dtype)


def _run_dtype(x: torch.Tensor, flag: Optional[bool]) -> Optional[torch.dtype]:
    """The dtype a conv of x runs in (autocast's when on), or None where the kernels must not serve x: not
    ``available``, not a 4-d map, a dispatch mode watching (FLOP counters and tracers see cuDNN's op), or a CPU
    tensor without the switch forced on."""
    if not x.is_cuda and flag is not True:  # first: the CPU paths pay one test
        return None
    if x.dim() != 4 or not available(x) or _get_current_dispatch_mode() is not None:
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def use_triton(x: torch.Tensor, kernel_size: int, dilation: int) -> bool:
    """Whether a depth-wise conv of x (N, C, H, W) runs through these kernels (``_run_dtype``, then ``decide``)."""
    dtype = _run_dtype(x, KERNELS.triton_dwconv)
    return dtype is not None and decide(kernel_size, dilation, tuple(x.shape[-2:]), dtype)


def decide_branches(kernel_sizes: Sequence[int], dilations: Sequence[int], hw: Tuple[int, int],
                    dtype: torch.dtype) -> bool:
    """The rule for a DilatedReparamBlock's branches (the large kernel first) in one launch per pass, without the
    device checks: ``KERNELS.triton_drb`` if set, else ``MEASURED_DRB``."""
    if not all(supported(k, d) for k, d in zip(kernel_sizes, dilations)):
        return False
    return _switch(KERNELS.triton_drb, MEASURED_DRB, (kernel_sizes[0], map_bucket(*hw)), dtype)


def use_branches(x: torch.Tensor, kernel_sizes: Sequence[int], dilations: Sequence[int]) -> bool:
    """Whether a DilatedReparamBlock's branches run on x together (``_run_dtype``, then ``decide_branches``)."""
    dtype = _run_dtype(x, KERNELS.triton_drb)
    return dtype is not None and decide_branches(kernel_sizes, dilations, tuple(x.shape[-2:]), dtype)


if triton is not None:
    # the map sizes are not specialised on (one compiled kernel for every map size); C and the strides are (16-
    # divisible, or 1), so the channel blocks of channels-last maps and of the packed weights load as vectors
    @triton.jit(do_not_specialize=['H', 'W', 'T', 'NB'])
    def _taps_kernel(x, w, taps, starts, b, out, C, H, W, T, NB, sxb, sxn, sxc, sxh, sxw, sob, son, soc, soh, sow,
                     SUM: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """Branch q has the taps t of starts[q] <= t < starts[q + 1]; tap t reads its input map shifted by
        (taps[2t], taps[2t + 1]) (zero outside the map) times w[t, :]. SUM: out = the sum over every branch, branch
        q reading input q (x + q * sxb); else out[q] (out + q * sob) = branch q's sum on x (sxb = 0) (+ b)."""
        n = tl.program_id(2).to(tl.int64)
        tiles_w = tl.cdiv(W, TILE_W)
        p = tl.arange(0, TILE_H * TILE_W)
        i = (tl.program_id(0) // tiles_w) * TILE_H + p // TILE_W
        j = (tl.program_id(0) % tiles_w) * TILE_W + p % TILE_W
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pix = (i * soh + j * sow)[:, None]
        ok = ((i < H) & (j < W))[:, None] & c_ok[None, :]
        acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
        x_q = x + n * sxn + (c * sxc)[None, :]  # input map q, output map q: advanced by sxb, sob per branch
        out_q = out + n * son + (c * soc)[None, :] + pix
        for q in range(NB):
            for t in range(tl.load(starts + q), tl.load(starts + q + 1)):
                ii = i + tl.load(taps + 2 * t)
                jj = j + tl.load(taps + 2 * t + 1)
                m = (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
                xv = tl.load(x_q + (ii * sxh + jj * sxw)[:, None], mask=m[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w + t * C + c, mask=c_ok, other=0.0)
                acc += xv.to(ACC) * wv.to(ACC)[None, :]
            if not SUM:
                if HAS_BIAS:
                    acc += tl.load(b + c, mask=c_ok, other=0.0).to(ACC)[None, :]
                tl.store(out_q, acc.to(out.dtype.element_ty), mask=ok)
                acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            x_q += sxb
            out_q += sob
        if SUM:
            tl.store(out + n * son + (c * soc)[None, :] + pix, acc.to(out.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=['H', 'W', 'N', 'SPLIT', 'T'])
    def _taps_wgrad_kernel(x, g, taps, branch, part, C, H, W, N, SPLIT, T, sxn, sxc, sxh, sxw, sgb, sgn, sgc, sgh,
                           sgw, ACC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        """part[s, t, c] = sum over the (image, tile) pairs s, s + SPLIT, ... of
        g_q[n, c, i, j] x[n, c, i + taps[2t], j + taps[2t + 1]], g_q = g + q * sgb the gradient of tap t's branch
        q = branch[t]."""
        s0 = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        tiles_w = tl.cdiv(W, TILE_W)
        tiles = tl.cdiv(H, TILE_H) * tiles_w
        p = tl.arange(0, TILE_H * TILE_W)
        for t in range(T):
            di = tl.load(taps + 2 * t)
            dj = tl.load(taps + 2 * t + 1)
            g_t = g + tl.load(branch + t).to(tl.int64) * sgb
            acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            for s in range(s0, N * tiles, SPLIT):
                n = (s // tiles).to(tl.int64)
                tile = s % tiles
                i = (tile // tiles_w) * TILE_H + p // TILE_W
                j = (tile % tiles_w) * TILE_W + p % TILE_W
                ok = (i < H) & (j < W)
                gv = tl.load(g_t + n * sgn + (c * sgc)[None, :] + (i * sgh + j * sgw)[:, None],
                             mask=ok[:, None] & c_ok[None, :], other=0.0)
                ii = i + di
                jj = j + dj
                m = ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
                xv = tl.load(x + n * sxn + (c * sxc)[None, :] + (ii * sxh + jj * sxw)[:, None],
                             mask=m[:, None] & c_ok[None, :], other=0.0)
                acc += gv.to(ACC) * xv.to(ACC)
            tl.store(part + (s0 * T + t) * C + c, tl.sum(acc, axis=0), mask=c_ok)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


TILE_ELEMENTS = 1024  # pixels x channels per program: the fp32 accumulator tile stays in registers


def _tiles(t: torch.Tensor) -> Tuple[int, int, int]:
    """(TILE_H, TILE_W, BLOCK_C) for t's layout: channel blocks along the contiguous channels of channels-last
    tensors, pixel rows along the contiguous columns otherwise."""
    c, h, w = t.shape[1:]
    if t.stride(1) == 1 and c > 1:  # channels-last
        block_c = min(_pow2(c), 64)
        tile_w = min(_pow2(w), 8)
        tile_h = min(_pow2(h), max(1, TILE_ELEMENTS // (block_c * tile_w)))
    else:
        tile_w = min(_pow2(w), 32)
        tile_h = min(_pow2(h), 8)
        block_c = min(_pow2(c), max(1, TILE_ELEMENTS // (tile_h * tile_w)))
    return tile_h, tile_w, block_c


def _acc(t: torch.Tensor):
    """The accumulation type: fp32, fp64 for fp64 tensors."""
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _check(x: torch.Tensor, sizes: Sequence[int], dilations: Sequence[int]):
    if x.dim() != 4 or not all(supported(k, d) for k, d in zip(sizes, dilations)):
        raise ValueError(f'Triton depth-wise conv: odd kernels 3 to 17, dilation >= 1, (N, C, H, W) input; '
                         f'got kernels {list(sizes)}, dilations {list(dilations)}, input shape {tuple(x.shape)}')


@functools.lru_cache(maxsize=None)
def _tap_table(sizes: Tuple[int, ...], dilations: Tuple[int, ...], sign: int,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets (T, 2), starts (branches + 1), branch of each tap (T)), int32 on ``device``, for 'same' kernels of
    ``sizes`` with ``dilations``, taps in row-major order; ``sign`` -1 negates the offsets (input gradient). Cached:
    built once per block shape, not copied to the device at every call."""
    offsets, starts, branch = [], [0], []
    for q, (k, d) in enumerate(zip(sizes, dilations)):
        r = k // 2
        offsets += [(sign * (a - r) * d, sign * (b - r) * d) for a in range(k) for b in range(k)]
        branch += [q] * (k * k)
        starts.append(len(offsets))
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (offsets, starts, branch))


def _packed(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T, C): each (C, 1, k, k) kernel's taps in row-major order, branch after branch; a tap's weights are
    contiguous, so a block of channels loads them as one vector."""
    return torch.cat([w.reshape(w.shape[0], -1) for w in weights], 1).t().contiguous()


def _stacked(like: torch.Tensor, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty (n, N, C, H, W) tensor whose maps are laid out like ``like``: channels-last or contiguous."""
    b, c, h, w = like.shape
    dtype = dtype or like.dtype
    if like.stride(1) == 1 and c > 1:
        return like.new_empty(n, b, h, w, c, dtype=dtype).permute(0, 1, 4, 2, 3)
    return like.new_empty(n, b, c, h, w, dtype=dtype)


def _launch(x: torch.Tensor, sxb: int, weights: Sequence[torch.Tensor], dilations: Sequence[int], out: torch.Tensor,
            sob: int, summed: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One ``_taps_kernel`` launch: x is input map 0 (the next ones sxb elements apart), out output map 0 (sob)."""
    n, c, h, w = out.shape[-4:]
    sizes = tuple(wt.shape[-1] for wt in weights)
    taps, starts, _ = _tap_table(sizes, tuple(dilations), -1 if summed else 1, x.device)
    if out.numel() == 0:
        return out
    th, tw, bc = _tiles(x)
    grid = (triton.cdiv(h, th) * triton.cdiv(w, tw), triton.cdiv(c, bc), n)
    kernel = _packed(weights)
    _taps_kernel[grid](x, kernel, taps, starts, bias if bias is not None else kernel, out, c, h, w, kernel.shape[0],
                       len(sizes), sxb, *x.stride(), sob, *out.stride()[-4:], SUM=summed, HAS_BIAS=bias is not None,
                       ACC=_acc(x), TILE_H=th, TILE_W=tw, BLOCK_C=bc)
    return out


def branches_forward(x: torch.Tensor, weights: Sequence[torch.Tensor], dilations: Sequence[int]) -> torch.Tensor:
    """(B, N, C, H, W): the depth-wise 'same' convolution of x with each (C, 1, k, k) weight of ``weights`` at its
    dilation, one launch; each map in x's dtype and memory layout."""
    _check(x, [wt.shape[-1] for wt in weights], dilations)
    out = _stacked(x, len(weights))
    _launch(x, 0, weights, dilations, out[0], out.stride(0), summed=False)
    return out


def branches_input_grad(grads: torch.Tensor, weights: Sequence[torch.Tensor], dilations: Sequence[int]
                        ) -> torch.Tensor:
    """Gradient of ``branches_forward``'s input from the output gradients ``grads`` (B, N, C, H, W), summed over
    the branches in one accumulator, one launch; in the gradients' dtype and layout."""
    g = grads[0]
    _check(g, [wt.shape[-1] for wt in weights], dilations)
    out = torch.empty_like(g, memory_format=torch.preserve_format)
    return _launch(g, grads.stride(0), weights, dilations, out, 0, summed=True)


def _split(x: torch.Tensor, pairs: int, c_blocks: int) -> int:
    """Programs per channel block of the weight gradient: a few per streaming multiprocessor in all."""
    if not x.is_cuda:
        return min(pairs, 3)  # the interpreter: a few shares, so the split is exercised
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(pairs, 4 * sms // c_blocks))


def _weight_grads(x: torch.Tensor, g: torch.Tensor, sgb: int, sizes: Sequence[int],
                  dilations: Sequence[int]) -> torch.Tensor:
    """(C, T) kernel gradients (a transposed view) of branches ``sizes``/``dilations`` on x, g output gradient 0
    (the next ones sgb elements apart), in at least fp32."""
    _check(x, sizes, dilations)
    taps, _, branch = _tap_table(tuple(sizes), tuple(dilations), 1, x.device)
    n, c, h, w = x.shape
    th, tw, bc = _tiles(x)
    pairs = n * triton.cdiv(h, th) * triton.cdiv(w, tw)
    c_blocks = triton.cdiv(c, bc)
    split = _split(x, pairs, c_blocks)
    part = torch.zeros(split, taps.shape[0], c, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if pairs > 0:
        _taps_wgrad_kernel[(split, c_blocks)](x, g, taps, branch, part, c, h, w, n, split, taps.shape[0],
                                              *x.stride(), sgb, *g.stride(), ACC=_acc(x), TILE_H=th, TILE_W=tw,
                                              BLOCK_C=bc)
    return part.sum(0).t()


def branches_weight_grad(x: torch.Tensor, grads: torch.Tensor, weights: Sequence[torch.Tensor],
                         dilations: Sequence[int]) -> List[torch.Tensor]:
    """The (C, 1, k, k) gradient of each kernel of ``branches_forward`` from the output gradients ``grads``
    (B, N, C, H, W), one launch; fp32 accumulation, in the weights' dtypes."""
    sizes = [wt.shape[-1] for wt in weights]
    flat = _weight_grads(x, grads[0], grads.stride(0), sizes, dilations)
    return [part.reshape(wt.shape).to(wt.dtype) for part, wt in zip(flat.split([k * k for k in sizes], 1), weights)]


def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   dilation: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation * (K - 1) // 2, dilation=dilation, groups=C) for weight
    (C, 1, K, K): in x's dtype (fp32 accumulation) and memory layout."""
    _check(x, [weight.shape[-1]], [dilation])
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    return _launch(x, 0, [weight], [dilation], out, 0, summed=False,
                   bias=bias.contiguous() if bias is not None else None)


def dwconv_input_grad(grad: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Gradient of ``dwconv_forward`` with respect to its input (the convolution of the output gradient with the
    flipped kernel); in grad's dtype and memory layout."""
    return branches_input_grad(grad[None], [weight], [dilation])


def dwconv_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(C, 1, K, K) gradient of ``dwconv_forward``'s kernel: sum over images and pixels of
    grad[n, c, i, j] * x[n, c, i + (a - K // 2) * d, j + (b - K // 2) * d] (zero outside the map), accumulated in
    fp32, returned in ``dtype`` (the weight's; x's when None)."""
    flat = _weight_grads(x, grad, 0, [kernel_size], [dilation])
    return flat.reshape(x.shape[1], 1, kernel_size, kernel_size).to(dtype or x.dtype)


def dwconv_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dilation: int,
                    mask: Tuple[bool, bool]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input gradient, kernel gradient), the ones ``mask`` asks for, as ``dwconv.dw_conv2d_backward``."""
    gx = dwconv_input_grad(grad, weight, dilation) if mask[0] else None
    gw = dwconv_weight_grad(x, grad, weight.shape[-1], dilation, weight.dtype) if mask[1] else None
    return gx, gw
