"""Fused depth-wise 'same' convolution in Triton for CUDA: forward, input gradient and weight gradient.

OverLoCK's depth-wise convolutions (K x K kernels up to 17x17, dilated 3x3 to 9x9 re-parameterisation branches)
go through cuDNN's direct kernels, which are slow for wide kernels in all three passes. These kernels run the three
passes straight from the inputs, with fp32 accumulation whatever the input dtype:

* forward: a program takes a tile of pixels (TILE_H x TILE_W) of BLOCK_C channels of one image and walks the K x K
  taps, each a load of the shifted input tile (zero outside the map: 'same' padding d * (K - 1) / 2) times the
  tap's weights; bias added at the end;
* input gradient: the same kernel on the output gradient with the kernel flipped (stride 1, 'same' padding: the
  transposed convolution is the convolution with the flipped kernel);
* weight gradient: a program takes BLOCK_C channels and a share of the (image, tile) pairs; per tap it sums
  grad * shifted input over its share and writes one fp32 partial sum per channel and tap; the shares are then
  summed by torch (deterministic, no atomics). The bias gradient is a plain torch sum.

Strides are arguments, so NCHW and channels-last tensors (and strided views) run without a copy; the tile shape
follows the layout (wide channel blocks for channels-last, wide pixel rows for NCHW). Odd kernels 3 to 17,
dilation >= 1, stride 1; fp32, fp16, bf16 (and fp64 through the interpreter). ``TRITON_INTERPRET=1`` runs the same
kernels on CPU tensors, which is how the test suite checks them without a GPU.

Dispatch (``use_triton``, called by ``dwconv.dw_conv2d`` and the training-form functions on CUDA): cuDNN stays the
default. ``KERNELS.triton_dwconv`` (``ops.config``; ``OVERLOCK_TRITON_DWCONV=1``) forces these kernels for every
supported convolution on CUDA, False (``=0``) forces cuDNN; otherwise ``MEASURED[(kernel, dilation, map_bucket(h, w),
dtype name)]`` decides, and a missing entry means cuDNN. The table is filled from a GPU run of

    python tools/benchmark.py --device cuda --ops dwconv --json dwconv.json

which times cuDNN against these kernels (forward + both gradients) on the shapes OverLoCK meets, in fp16 and bf16,
NCHW and channels-last, and prints the entries to paste here: True where the kernels were faster in every layout
measured for that key.
"""
import os
from typing import Dict, Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .config import KERNELS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: cuDNN / PyTorch serve every convolution
    triton = None

__all__ = ['MEASURED', 'available', 'decide', 'depthwise_conv2d', 'dwconv_backward', 'dwconv_forward',
           'dwconv_input_grad', 'dwconv_weight_grad', 'map_bucket', 'supported', 'use_triton']

DTYPE_NAMES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}
MAP_BUCKETS = (16, 32, 64, 128, 256)  # map_bucket: the side of the smallest of these squares holding the map

# (kernel, dilation, map bucket, dtype name) -> whether the Triton kernels beat cuDNN there (fwd + both grads).
# Empty until measured on a GPU (see the module docstring): cuDNN everywhere.
MEASURED: Dict[Tuple[int, int, int, str], bool] = {}


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can serve this tensor: Triton installed, not while torch.compile traces, and the tensor
    on CUDA (or on the CPU with Triton's interpreter on)."""
    if triton is None or torch.compiler.is_compiling():
        return False
    return t.is_cuda or (t.device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') == '1')


def supported(kernel_size: int, dilation: int) -> bool:
    """The convolutions the kernels implement: odd square kernels 3 to 17, any dilation, stride 1."""
    return kernel_size % 2 == 1 and 3 <= kernel_size <= 17 and dilation >= 1


def map_bucket(h: int, w: int) -> int:
    """The map-size key of ``MEASURED``: the side of the smallest square of ``MAP_BUCKETS`` with h * w pixels or
    more (0: larger than all)."""
    return next((s for s in MAP_BUCKETS if h * w <= s * s), 0)


def decide(kernel_size: int, dilation: int, hw: Tuple[int, int], dtype: torch.dtype) -> bool:
    """The dispatch rule without the device checks: ``KERNELS.triton_dwconv`` if set, else the measured table."""
    if not supported(kernel_size, dilation) or dtype not in DTYPE_NAMES:
        return False
    if KERNELS.triton_dwconv is not None:
        return KERNELS.triton_dwconv
    return MEASURED.get((kernel_size, dilation, map_bucket(*hw), DTYPE_NAMES[dtype]), False)


def use_triton(x: torch.Tensor, kernel_size: int, dilation: int) -> bool:
    """Whether a depth-wise conv of x (N, C, H, W) runs through these kernels: CUDA tensors only, never while a
    dispatch mode watches (FLOP counters, tracers see cuDNN's op), then ``decide`` for the dtype it will run in
    (autocast's when on)."""
    if not x.is_cuda or x.dim() != 4 or not available(x) or _get_current_dispatch_mode() is not None:
        return False
    dtype = torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else x.dtype
    return decide(kernel_size, dilation, tuple(x.shape[-2:]), dtype)


if triton is not None:
    # sizes not specialised on (one compiled kernel for every map size); strides are (contiguity, alignment)
    @triton.jit(do_not_specialize=['C', 'H', 'W'])
    def _dwconv_kernel(x, w, b, out, C, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                     K: tl.constexpr, DIL: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                     TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[n, c, i, j] = sum_ab w[c, a, b] x[n, c, i + (a - K // 2) DIL, j + (b - K // 2) DIL] (+ b[c])."""
        n = tl.program_id(2).to(tl.int64)
        tiles_w = tl.cdiv(W, TILE_W)
        p = tl.arange(0, TILE_H * TILE_W)
        i = (tl.program_id(0) // tiles_w) * TILE_H + p // TILE_W
        j = (tl.program_id(0) % tiles_w) * TILE_W + p % TILE_W
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        R: tl.constexpr = K // 2
        x_ch = x + n * sxn + (c * sxc)[None, :]
        acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
        for a in range(K):
            ii = i + (a - R) * DIL
            row_ok = (ii >= 0) & (ii < H)
            for bb in tl.static_range(K):
                jj = j + (bb - R) * DIL
                m = row_ok & (jj >= 0) & (jj < W)
                xv = tl.load(x_ch + (ii * sxh + jj * sxw)[:, None], mask=m[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w + c * (K * K) + (a * K + bb), mask=c_ok, other=0.0)
                acc += xv.to(ACC) * wv.to(ACC)[None, :]
        if HAS_BIAS:
            acc += tl.load(b + c, mask=c_ok, other=0.0).to(ACC)[None, :]
        ok = (i < H) & (j < W)
        tl.store(out + n * son + (c * soc)[None, :] + (i * soh + j * sow)[:, None], acc.to(out.dtype.element_ty),
                 mask=ok[:, None] & c_ok[None, :])

    @triton.jit(do_not_specialize=['C', 'H', 'W', 'N', 'SPLIT'])
    def _dwconv_wgrad_kernel(x, g, part, C, H, W, N, SPLIT, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                            K: tl.constexpr, DIL: tl.constexpr, ACC: tl.constexpr,
                            TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """part[s, c, a * K + b] = sum over the (image, tile) pairs s, s + SPLIT, ... of
        g[n, c, i, j] x[n, c, i + (a - K // 2) DIL, j + (b - K // 2) DIL]."""
        s0 = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        R: tl.constexpr = K // 2
        tiles_w = tl.cdiv(W, TILE_W)
        tiles = tl.cdiv(H, TILE_H) * tiles_w
        p = tl.arange(0, TILE_H * TILE_W)
        for t in range(K * K):
            di = (t // K - R) * DIL
            dj = (t % K - R) * DIL
            acc = tl.zeros((TILE_H * TILE_W, BLOCK_C), dtype=ACC)
            for s in range(s0, N * tiles, SPLIT):
                n = (s // tiles).to(tl.int64)
                tile = s % tiles
                i = (tile // tiles_w) * TILE_H + p // TILE_W
                j = (tile % tiles_w) * TILE_W + p % TILE_W
                ok = (i < H) & (j < W)
                gv = tl.load(g + n * sgn + (c * sgc)[None, :] + (i * sgh + j * sgw)[:, None],
                             mask=ok[:, None] & c_ok[None, :], other=0.0)
                ii = i + di
                jj = j + dj
                m = ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
                xv = tl.load(x + n * sxn + (c * sxc)[None, :] + (ii * sxh + jj * sxw)[:, None],
                             mask=m[:, None] & c_ok[None, :], other=0.0)
                acc += gv.to(ACC) * xv.to(ACC)
            tl.store(part + s0 * C * K * K + c * (K * K) + t, tl.sum(acc, axis=0), mask=c_ok)


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


def _check(x: torch.Tensor, kernel_size: int, dilation: int):
    if not supported(kernel_size, dilation) or x.dim() != 4:
        raise ValueError(f'Triton depth-wise conv: odd kernels 3 to 17, dilation >= 1, (N, C, H, W) input; '
                         f'got kernel {kernel_size}, dilation {dilation}, input shape {tuple(x.shape)}')


def _conv(x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
    """The forward kernel on x with a contiguous (C, K * K) ``kernel``; output in x's dtype and memory layout."""
    n, c, h, w = x.shape
    k = int(round(kernel.shape[-1] ** 0.5))
    out = torch.empty_like(x, memory_format=torch.preserve_format)
    if out.numel() == 0:
        return out
    th, tw, bc = _tiles(x)
    grid = (triton.cdiv(h, th) * triton.cdiv(w, tw), triton.cdiv(c, bc), n)
    _dwconv_kernel[grid](x, kernel, bias if bias is not None else kernel, out, c, h, w, *x.stride(), *out.stride(),
                         K=k, DIL=dilation, HAS_BIAS=bias is not None, ACC=_acc(x), TILE_H=th, TILE_W=tw, BLOCK_C=bc)
    return out


def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   dilation: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=dilation * (K - 1) // 2, dilation=dilation, groups=C) for weight
    (C, 1, K, K): in x's dtype (fp32 accumulation) and memory layout."""
    k = weight.shape[-1]
    _check(x, k, dilation)
    kernel = weight.reshape(weight.shape[0], k * k).contiguous()
    return _conv(x, kernel, bias.contiguous() if bias is not None else None, dilation)


def dwconv_input_grad(grad: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Gradient of ``dwconv_forward`` with respect to its input: the convolution of the output gradient with the
    flipped kernel; in grad's dtype and memory layout."""
    k = weight.shape[-1]
    _check(grad, k, dilation)
    kernel = weight.flip(2, 3).reshape(weight.shape[0], k * k).contiguous()
    return _conv(grad, kernel, None, dilation)


def _split(x: torch.Tensor, pairs: int, c_blocks: int) -> int:
    """Programs per channel block of the weight gradient: a few per streaming multiprocessor in all."""
    if not x.is_cuda:
        return min(pairs, 3)  # the interpreter: a few shares, so the split is exercised
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(pairs, 4 * sms // c_blocks))


def dwconv_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int,
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(C, 1, K, K) gradient of ``dwconv_forward``'s kernel: sum over images and pixels of
    grad[n, c, i, j] * x[n, c, i + (a - K // 2) * d, j + (b - K // 2) * d] (zero outside the map), accumulated in
    fp32, returned in ``dtype`` (the weight's; x's when None)."""
    _check(x, kernel_size, dilation)
    n, c, h, w = x.shape
    k = kernel_size
    th, tw, bc = _tiles(x)
    pairs = n * triton.cdiv(h, th) * triton.cdiv(w, tw)
    c_blocks = triton.cdiv(c, bc)
    split = _split(x, pairs, c_blocks)
    part = torch.zeros(split, c, k * k, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if pairs > 0:
        _dwconv_wgrad_kernel[(split, c_blocks)](x, grad, part, c, h, w, n, split, *x.stride(), *grad.stride(),
                                                K=k, DIL=dilation, ACC=_acc(x), TILE_H=th, TILE_W=tw, BLOCK_C=bc)
    return part.sum(0).view(c, 1, k, k).to(dtype or x.dtype)


def dwconv_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dilation: int,
                    mask: Tuple[bool, bool]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input gradient, kernel gradient), the ones ``mask`` asks for, as ``dwconv.dw_conv2d_backward``."""
    gx = dwconv_input_grad(grad, weight, dilation) if mask[0] else None
    gw = dwconv_weight_grad(x, grad, weight.shape[-1], dilation, weight.dtype) if mask[1] else None
    return gx, gw


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return dwconv_forward(x, weight, bias, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw = dwconv_backward(x, weight, grad, ctx.dilation, need[:2])
        gb = None
        if ctx.has_bias and need[2]:
            gb = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)).to(weight.dtype)
        return gx, gw, gb, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dilation: int = 1) -> torch.Tensor:
    """Differentiable depth-wise 'same' convolution through the kernels; under autocast it runs in the autocast
    dtype, as cuDNN's would."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return _DepthwiseConv.apply(x, weight, bias, dilation)
