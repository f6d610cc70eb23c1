"""Depth-wise 'same' convolution with a fast CPU backward.

PyTorch's CPU backward for depth-wise convolutions is the bottleneck of OverLoCK training on a CPU: the weight
gradient of a 9x9 to 17x17 depth-wise kernel and the input gradient of a dilated one cost many times the forward,
and oneDNN's forward itself falls off its fast path for kernels wider than 13 in NCHW layout. ``dw_conv2d`` keeps the
result and computes both gradients with forward-style operations:

* forward and input gradient (a depth-wise convolution of the output gradient with the flipped kernel) in
  channels-last layout for kernels spanning 14 pixels or more (11 without AVX-512: oneDNN's fast path), in the
  given layout otherwise;
* when gradients are recorded on maps up to 16x16, dilated kernels of 9 taps or more run as the dense kernel with
  zeros between the taps (without gradients the plain dilated conv runs, so FLOP counters see the model's own conv);
* dilated kernels padded by more than 6 (4 without AVX-512) get the extra zeros up front (``DILATED_PAD``:
  oneDNN's slow path);
* weight gradient: on maps up to 16x16 (kernels of 5 to 13, and 3x3 with dilation 2 or 3; without AVX-512 every
  kernel under 9x9 on maps up to 128x128, ``GROUPED_WGRAD_MAP``), a grouped convolution that uses the output
  gradient as the kernel (channels-last when padded by more than 3 without AVX-512); for kernels of 9 taps or more
  on larger maps, a cross-correlation through ``torch.fft`` (cost independent of K, summed over the batch in
  frequency space, in at least fp32); otherwise PyTorch's weight gradient on channels-last inputs, where it is fast;
  without AVX-512, PyTorch's backward of 3x3 kernels on channels-last maps (``NHWC_3X3_BACKWARD``).
* ``SpectralGrads``: both gradients of a sum of depth-wise convolutions of one input (a DilatedReparamBlock's
  branches) in frequency space on maps larger than 16x16 with enough work per transform (``SpectralGrads.use``;
  3x3 branches on maps up to 32x32 stay per branch, ``takes``): the input's transform is shared by every branch,
  each branch adds one transform of its output gradient, and one inverse transform gives the summed input
  gradient. On the 56x56 and 28x28 maps of a 224 input this beats the per-branch methods above.

The thresholds come from timing every shape OverLoCK meets on 2-core x86 CPUs with and without AVX-512 (oneDNN;
see docs/performance.md); they only pick between exact methods. On other devices, and for plain 3x3 kernels,
``dw_conv2d`` is ``F.conv2d``; on CUDA the fused Triton kernels of ``triton_dwconv`` run instead where
``triton_dwconv.use_triton`` says so (where measured faster than cuDNN, or switched on). The CPU method and the
Triton kernels run as the custom operators ``overlock::dw_conv2d`` and ``overlock::dw_conv2d_backward``, in eager
mode and under ``torch.compile`` alike (opaque to the compiler).
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..export import plain_ops_active
from . import triton_dwconv
from .grn import _channels_last, _laid_out_like

__all__ = ['SpectralGrads', 'autocast_args', 'dense_dilated', 'dilate_and_pad', 'dw_conv2d', 'dw_conv2d_backward',
           'dw_weight_grad']

LARGE_KERNEL = 9  # from this many taps on the weight gradient is computed by us
SMALL_MAP = 16 * 16  # at most this many pixels and ...
SMALL_MAP_MAX_K = 13  # ... at most this many taps: grouped-conv weight gradient (wider kernels hit a slow path)
# oneDNN's depth-wise kernels leave their fast paths at other sizes with AVX-512 than with AVX2 alone: the layout
# and padding thresholds below were measured on one host of each (other CPUs take the AVX2 ones)
AVX512 = torch.backends.cpu.get_cpu_capability().startswith('AVX512')
NHWC_SPAN = 14 if AVX512 else 11  # kernels spanning this many pixels or more run channels-last
DILATED_PAD = 6 if AVX512 else 4  # dilated kernels leave the fast path from padding 7 on (AVX-512), 5 on (AVX2)
WIDEN = {13: 15} if AVX512 else {}  # channels-last 13x13 kernels: faster padded to 15x15 with AVX-512, not AVX2
WGRAD_NHWC_PAD = None if AVX512 else 3  # AVX2: grouped weight gradients padded by more than this run channels-last
GROUPED_WGRAD_MAP = None if AVX512 else 128 * 128  # AVX2: kernels under LARGE_KERNEL: grouped weight gradient on maps
# up to this size, not only SMALL_MAP (PyTorch's is slower there)
NHWC_3X3_BACKWARD = not AVX512  # AVX2: the backward of 3x3 kernels is faster on channels-last maps
SPECTRAL_TAPS = 15  # SpectralGrads.use: the taps per transform from which frequency space pays (measured at 1-8 images)
SPECTRAL_MAP = 64 * 64  # ... and the map size from which it always does
SPATIAL_3X3_MAP = 32 * 32  # SpectralGrads.takes: 3x3 branches on maps up to this size stay out of frequency space
IRFFT_BYTES = 1 << 20  # inverse transforms in chunks of this much spectrum (``_irfft2``)


def dilate_and_pad(kernel: torch.Tensor, dilation: int, size: int) -> torch.Tensor:
    """(C, 1, k, k) kernel -> (C, 1, size, size): zeros inserted between the taps (dilation), zero-padded around,
    centred; differentiable. The same dense kernel as the dilated one: used to merge re-parameterised branches
    and to run dilated kernels as dense ones."""
    c, _, k, _ = kernel.shape
    ek = dilation * (k - 1) + 1
    out = kernel.new_zeros(c, 1, ek, ek)
    out[:, :, ::dilation, ::dilation] = kernel
    pad = (size - ek) // 2
    return F.pad(out, (pad, pad, pad, pad))


def _layout(x: torch.Tensor, kernel_size: int, dilation: int, cache: Optional[dict] = None) -> torch.Tensor:
    """x in the layout the conv is fastest with; ``cache``: see ``_in_format``."""
    if dilation * (kernel_size - 1) + 1 >= NHWC_SPAN:
        return _in_format(x, torch.channels_last, cache)
    return x  # small kernels are fast in either layout: avoid a copy


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
    k = weight.shape[-1]
    # Triton: only where no autograd graph and no autocast would miss the kernel (operators' and autograd functions'
    # bodies)
    if triton_dwconv.use_triton(x, k, dilation) and not torch.is_autocast_enabled(x.device.type) \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
            and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype):
        return triton_dwconv.dwconv_forward(x, weight, bias, dilation)
    # not while a dispatch mode watches (FlopCounterMode, tracers): they should see the model's own kernel
    if dilation == 1 and k in WIDEN and x.device.type == 'cpu' and _channels_last(x) \
            and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None:
        weight = F.pad(weight, ((WIDEN[k] - k) // 2,) * 4)  # zero taps around: the same convolution
    pad = dilation * (weight.shape[-1] - 1) // 2
    if dilation > 1 and pad > DILATED_PAD and x.device.type == 'cpu':  # e.g. 3x3 with dilation 7 (K=15, 17, 19)
        x, pad = F.pad(x, (pad - DILATED_PAD,) * 4), DILATED_PAD  # the extra zeros up front: keeps the fast path
    return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=weight.shape[0])


def dw_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(C, 1, K, K) gradient of a depth-wise 'same' convolution's kernel: sum over batch and pixels of
    grad[n, c, i, j] * x[n, c, i + (a - K//2) * d, j + (b - K//2) * d], zero outside the map."""
    b, c, h, w = x.shape
    pad = dilation * (kernel_size - 1) // 2
    if (h * w <= SMALL_MAP and kernel_size <= SMALL_MAP_MAX_K) or _grouped_wgrad(kernel_size, h * w):
        # grad as a (B*C)-group kernel, the K x K taps as output
        inp = x.reshape(1, b * c, h, w)
        if WGRAD_NHWC_PAD is not None and pad > WGRAD_NHWC_PAD:
            inp = inp.contiguous(memory_format=torch.channels_last)
        out = F.conv2d(inp, grad.reshape(b * c, 1, h, w), padding=pad, stride=dilation, groups=b * c)
        return out.reshape(b, c, kernel_size, kernel_size).sum(0).unsqueeze(1)
    spectral = SpectralGrads(x, [kernel_size], [dilation])  # a cross-correlation through torch.fft
    return spectral.kernel_grad(spectral.rfft(grad), kernel_size, dilation)


def _grouped_wgrad(kernel_size: int, pixels: int) -> bool:
    """Without AVX-512: the grouped-convolution weight gradient for kernels under ``LARGE_KERNEL`` on maps up to
    ``GROUPED_WGRAD_MAP`` as well."""
    return GROUPED_WGRAD_MAP is not None and kernel_size < LARGE_KERNEL and pixels <= GROUPED_WGRAD_MAP


def _lags(kernel_size: int, dilation: int, size: Tuple[int, int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices, modulo the transform size, of a 'same' kernel's taps as offsets -pad..pad (rows, then columns)."""
    pad = dilation * (kernel_size - 1) // 2
    lags = torch.arange(-pad, pad + 1, dilation, device=device)
    return lags % size[0], lags % size[1]


def _taps(corr: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(C, 1, K, K) kernel gradient from corr[c, u, v] = sum grad[i, j] * x[i + u, j + v] (lags modulo its size)."""
    rows, cols = _lags(kernel_size, dilation, corr.shape[-2:], corr.device)
    return corr[:, rows][:, :, cols].unsqueeze(1)


def _smooth(n: int) -> int:
    """The smallest integer >= n with no prime factor above 5 (fast transform sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _irfft2(spec: torch.Tensor, size: Tuple[int, int], crop: Optional[Sequence[int]] = None) -> torch.Tensor:
    """torch.fft.irfft2(spec, s=size)[..., :crop[0], :crop[1]] (contiguous) in chunks of ``IRFFT_BYTES`` of spectrum:
    MKL's inverse of a large batch at once is cache-bound, slower than in chunks."""
    h, w = crop if crop is not None else size
    out = spec.new_empty(*spec.shape[:-2], h, w, dtype=spec.real.dtype)
    flat, maps = spec.reshape(-1, *spec.shape[-2:]), out.view(-1, h, w)
    step = max(1, IRFFT_BYTES // (flat[0].numel() * flat.element_size()))
    for i in range(0, flat.shape[0], step):
        maps[i:i + step] = torch.fft.irfft2(flat[i:i + step], s=size)[..., :h, :w]
    return out


class SpectralGrads:
    """Input and kernel gradients of sum_i conv(x, weight_i, dilation_i) (depth-wise, 'same') through ``torch.fft``.

    Transforms of size >= map + the widest kernel's half-width make the circular products equal the zero-padded
    ones: the input gradient is sum_i irfft(G_i * W_i) and each kernel gradient irfft(sum_n conj(X) * G_i) read at
    negated lags, G_i the transform of branch i's output gradient. X is shared, and so is the one inverse transform
    of the summed input gradient. In at least fp32. ``use(x)``: where it beats the per-branch methods (CPU, maps
    over 16x16)."""

    def __init__(self, x: torch.Tensor, kernel_sizes: Sequence[int], dilations: Sequence[int]):
        pad = max(d * (k - 1) // 2 for k, d in zip(kernel_sizes, dilations))
        self.shape, self.dtype = x.shape, x.dtype
        self.size = (_smooth(x.shape[-2] + pad), _smooth(x.shape[-1] + pad))
        self.acc = torch.promote_types(x.dtype, torch.float32)
        # one zero-padded buffer for every transform (the padding stays zero): no fresh map per branch
        self.buf = x.new_zeros(*x.shape[:2], *self.size, dtype=self.acc)
        self.fx = self.rfft(x).conj().resolve_conj()  # conjugated once, not per branch
        self.gx = None

    def interior(self) -> torch.Tensor:
        """The map-sized corner of the transform buffer: a gradient written there (``out=``) is not copied again."""
        return self.buf[..., :self.shape[-2], :self.shape[-1]]

    def rfft(self, t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != self.buf.data_ptr() or t.stride() != self.buf.stride():
            self.buf[..., :t.shape[-2], :t.shape[-1]].copy_(t)
        return torch.fft.rfft2(self.buf)

    def kernel_grad(self, spec: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
        """(C, 1, K, K) kernel gradient from an output gradient's transform ``spec``, in at least fp32."""
        prod = self.fx[0] * spec[0]
        for n in range(1, spec.shape[0]):  # summed over the batch image by image: no (N, C, ...) product
            prod.addcmul_(self.fx[n], spec[n])
        corr = _irfft2(prod, self.size)  # lags negated: sum x[i, j] g[i + u, j + v]
        return _taps(corr, kernel_size, dilation).flip(2, 3)

    @staticmethod
    def use(x: torch.Tensor, kernel_sizes: Sequence[int]) -> bool:
        """Whether it beats the per-branch methods for branches of ``kernel_sizes`` on x: a CPU map over 16x16 and
        enough work per transform. The per-branch cost grows with images x taps; the spectral one is
        (n + 2) x B map-sized transforms plus 2n channel-sized ones (kernels and kernel gradients), which small
        batches do not amortise for small kernels (e.g. stage 3-4 blocks at batch 1); maps over 64x64 gain from it
        anyway."""
        b, (h, w) = x.shape[0], x.shape[-2:]
        if x.device.type != 'cpu' or h * w <= SMALL_MAP:
            return False
        n, taps = len(kernel_sizes), sum(k * k for k in kernel_sizes)
        return h * w > SPECTRAL_MAP or b * taps >= SPECTRAL_TAPS * ((n + 2) * b + 2 * n)

    def takes(self, kernel_size: int) -> bool:
        """Whether a branch of this kernel size is cheaper here than through ``dw_conv2d_backward``: all but 3x3
        kernels on maps up to 32x32 (e.g. stage 2 at 224), where the per-branch 3x3 gradients are cheaper."""
        return kernel_size > 3 or self.shape[-2] * self.shape[-1] > SPATIAL_3X3_MAP

    def add(self, weight: torch.Tensor, dilation: int, grad: torch.Tensor, mask: Tuple[bool, bool]):
        """Takes branch (weight, dilation)'s output gradient; returns its kernel gradient if mask[1] asks for it and
        accumulates its input gradient if mask[0] does."""
        spec = self.rfft(grad)
        grad_w = self.kernel_grad(spec, weight.shape[-1], dilation).to(weight.dtype) if mask[1] else None
        if mask[0]:
            kernel = weight.new_zeros(weight.shape[0], *self.size, dtype=self.acc)
            rows, cols = _lags(weight.shape[-1], dilation, self.size, weight.device)
            kernel[:, rows[:, None], cols[None, :]] = weight[:, 0].to(self.acc)
            kernel = torch.fft.rfft2(kernel)
            self.gx = spec.mul_(kernel) if self.gx is None else self.gx.addcmul_(spec, kernel)
        return grad_w

    def input_grad(self) -> Optional[torch.Tensor]:
        if self.gx is None:
            return None
        return _irfft2(self.gx, self.size, self.shape[-2:]).to(self.dtype)


def _in_format(x: torch.Tensor, fmt: torch.memory_format, cache: Optional[dict]) -> torch.Tensor:
    """x.contiguous(memory_format=fmt), converted once per format across calls that share ``cache``."""
    if cache is None:
        return x.contiguous(memory_format=fmt)
    if fmt not in cache:
        cache[fmt] = x.contiguous(memory_format=fmt)
    return cache[fmt]


def dw_conv2d_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dilation: int,
                       mask: Tuple[bool, bool], x_formats: Optional[dict] = None
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input gradient, kernel gradient) of ``_conv(x, weight, _, dilation)`` for output gradient ``grad``, the ones
    ``mask`` asks for: the fast CPU methods above, PyTorch's own for 3x3 kernels and on other devices.
    ``x_formats``: a dict shared by calls with the same x (a DilatedReparamBlock's branches), so that x is converted
    to each memory layout once."""
    d, k = dilation, weight.shape[-1]
    pad = [d * (k - 1) // 2] * 2
    if triton_dwconv.use_triton(x, k, d):
        return triton_dwconv.dwconv_backward(x, weight, grad, d, mask)
    if x.device.type != 'cpu' or (k <= 3 and d == 1):
        if x.device.type == 'cpu' and NHWC_3X3_BACKWARD:
            x, grad = _in_format(x, torch.channels_last, x_formats), grad.contiguous(memory_format=torch.channels_last)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], pad, [d, d], False, [0, 0], weight.shape[0], [mask[0], mask[1], False])
        return grad_x, grad_w
    grad_x = grad_w = None
    if mask[0]:
        grad_x = _conv(_layout(grad, k, d), weight.flip(2, 3), None, d)
    # the grouped conv runs with stride = dilation: dilated 3x3 kernels only up to stride 3 (oneDNN's fast path)
    small = x.shape[-2] * x.shape[-1] <= SMALL_MAP and (5 <= k <= SMALL_MAP_MAX_K or (k == 3 and 1 < d <= 3))
    ours = k >= LARGE_KERNEL or small or _grouped_wgrad(k, x.shape[-2] * x.shape[-1])
    if mask[1] and ours:
        grad_w = dw_weight_grad(_in_format(x, torch.contiguous_format, x_formats), grad.contiguous(), k, d)
        grad_w = grad_w.to(weight.dtype)
    elif mask[1]:
        cl = torch.channels_last
        grad_w = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=cl), _in_format(x, cl, x_formats), weight, None, [1, 1], pad, [d, d],
            False, [0, 0], weight.shape[0], [False, True, False])[1]
    return grad_x, grad_w


def dense_dilated(weight: torch.Tensor, dilation: int, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(kernel, dilation) to run with gradients recorded on x: on maps up to 16x16 a dilated kernel of 9 taps or
    more as the dense kernel with zeros between its taps (differentiable; gradients reach the taps), whose gradients
    are faster there; on larger maps as it is, with the padding done up front (``DILATED_PAD``), which beats the
    dense form there."""
    if dilation > 1 and weight.shape[-1] >= LARGE_KERNEL and x.shape[-2] * x.shape[-1] <= SMALL_MAP:
        return dilate_and_pad(weight, dilation, dilation * (weight.shape[-1] - 1) + 1), 1
    return weight, dilation


def autocast_args(device: str, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The tensors in the device's autocast dtype when autocast is on (custom functions then run with it off)."""
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def dw_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              dilation: int = 1) -> torch.Tensor:
    """Depth-wise convolution, stride 1, 'same' padding d * (K - 1) / 2, odd square kernel (C, 1, K, K);
    ``F.conv2d`` while exported (``plain_ops_active``)."""
    if plain_ops_active():
        return F.conv2d(x, weight, bias, padding=dilation * (weight.shape[-1] - 1) // 2, dilation=dilation,
                        groups=weight.shape[0])
    k, dev = weight.shape[-1], x.device.type
    if not triton_dwconv.use_triton(x, k, dilation):  # on CUDA the Triton kernels where measured faster (or forced)
        grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if dev != 'cpu' or (k <= 3 and dilation == 1 and not (grads and NHWC_3X3_BACKWARD)):
            return _conv(x, weight, bias, dilation)  # cuDNN; PyTorch's own 3x3 (and its backward) with AVX-512
        if not grads:
            return _conv(_layout(x, k, dilation), weight, bias, dilation)
        weight, dilation = dense_dilated(weight, dilation, x)
    x, weight, bias = autocast_args(dev, x, weight, bias)
    with torch.autocast(dev, enabled=False):
        return torch.ops.overlock.dw_conv2d(x, weight, bias, dilation)


# The CPU method and the Triton kernels as custom operators with a registered backward: one mechanism for eager
# mode and torch.compile (traced, the CPU method would become aten's depth-wise backward, much slower on the CPU for
# the large kernels, and its data-pointer tests would break the graph). Outputs and gradients come back laid out
# like their inputs (CPU inputs: in the layout ``_layout`` picks).
def _op_layout(x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    return _layout(x, kernel_size, dilation) if x.device.type == 'cpu' else x


@torch.library.custom_op('overlock::dw_conv2d', mutates_args=())
def _dw_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  dilation: int) -> torch.Tensor:
    x = _op_layout(x, weight.shape[-1], dilation)
    if triton_dwconv.use_triton(x, weight.shape[-1], dilation):
        return triton_dwconv.dwconv_forward(x, weight, bias, dilation)
    return _laid_out_like(_conv(x, weight, bias, dilation), x)


@_dw_conv2d_op.register_fake
def _(x, weight, bias, dilation):
    return _laid_out_like(x.new_empty(x.shape), _op_layout(x, weight.shape[-1], dilation))


@torch.library.custom_op('overlock::dw_conv2d_backward', mutates_args=())
def _dw_conv2d_backward_op(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dilation: int,
                           need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    gx, gw = dw_conv2d_backward(x, weight, grad, dilation, (need_x, need_w))
    return (x.new_empty(0) if gx is None else _laid_out_like(gx, x),
            weight.new_empty(0) if gw is None else gw.contiguous())


@_dw_conv2d_backward_op.register_fake
def _(x, weight, grad, dilation, need_x, need_w):
    return (_laid_out_like(x.new_empty(x.shape), x) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape if need_w else 0))


def _dw_op_setup(ctx, inputs, output):
    x, weight, bias, ctx.dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _dw_op_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw = torch.ops.overlock.dw_conv2d_backward(x, weight, grad, ctx.dilation, need[0], need[1])
    gb = grad.sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias and need[2] else None
    return gx if need[0] else None, gw if need[1] else None, gb, None


_dw_conv2d_op.register_autograd(_dw_op_backward, setup_context=_dw_op_setup)
