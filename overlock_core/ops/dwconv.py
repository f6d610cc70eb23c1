"""Depth-wise 'same' convolution with a fast CPU backward.

PyTorch's CPU backward for depth-wise convolutions is the bottleneck of OverLoCK training on a CPU: the weight
gradient of a 9x9 to 17x17 depth-wise kernel costs 10-40x its forward, dilated input gradients 10-100x, and
oneDNN's forward itself falls off its fast path for kernels wider than 13 in NCHW layout. ``dw_conv2d`` keeps the
result and computes both gradients with forward-style operations:

* forward and input gradient (a depth-wise convolution of the output gradient with the flipped kernel) in
  channels-last layout for kernels spanning 14 pixels or more (oneDNN's fast path), in the given layout otherwise;
* when gradients are recorded, dilated kernels of 9 taps or more run as the dense kernel with zeros between the
  taps (without gradients the plain dilated conv runs, so FLOP counters see the model's own conv);
* weight gradient: on maps up to 16x16 (kernels of 5 to 13), a grouped convolution that uses the output gradient as
  the kernel; for kernels of 9 taps or more on larger maps, a cross-correlation through ``torch.fft`` (cost
  independent of K, summed over the batch in frequency space, in at least fp32); otherwise PyTorch's weight
  gradient on channels-last inputs, where it is fast.

The thresholds come from timing every shape OverLoCK meets on a 2-core x86 CPU (oneDNN); they only pick between
exact methods. On other devices, and for plain 3x3 kernels, ``dw_conv2d`` is ``F.conv2d``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['autocast_args', 'dense_dilated', 'dilate_and_pad', 'dw_conv2d', 'dw_conv2d_backward', 'dw_weight_grad']

LARGE_KERNEL = 9  # from this many taps on the weight gradient is computed by us
SMALL_MAP = 16 * 16  # at most this many pixels and ...
SMALL_MAP_MAX_K = 13  # ... at most this many taps: grouped-conv weight gradient (wider kernels hit a slow path)
NHWC_SPAN = 14  # kernels spanning this many pixels or more run channels-last


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


def _layout(x: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    if dilation * (kernel_size - 1) + 1 >= NHWC_SPAN:
        return x.contiguous(memory_format=torch.channels_last)
    return x  # small kernels are fast in either layout: avoid a copy


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> torch.Tensor:
    pad = dilation * (weight.shape[-1] - 1) // 2
    return F.conv2d(x, weight, bias, padding=pad, dilation=dilation, groups=weight.shape[0])


def dw_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(C, 1, K, K) gradient of a depth-wise 'same' convolution's kernel: sum over batch and pixels of
    grad[n, c, i, j] * x[n, c, i + (a - K//2) * d, j + (b - K//2) * d], zero outside the map."""
    b, c, h, w = x.shape
    pad = dilation * (kernel_size - 1) // 2
    if h * w <= SMALL_MAP and kernel_size <= SMALL_MAP_MAX_K:  # grad as a (B*C)-group kernel, the K x K taps as output
        out = F.conv2d(x.reshape(1, b * c, h, w), grad.reshape(b * c, 1, h, w), padding=pad, stride=dilation,
                       groups=b * c)
        return out.reshape(b, c, kernel_size, kernel_size).sum(0).unsqueeze(1)
    size = (h + pad, w + pad)  # long enough that lags -pad..pad do not wrap onto the map
    dtype = torch.promote_types(x.dtype, torch.float32)
    spec = torch.fft.rfft2(x.to(dtype), s=size) * torch.fft.rfft2(grad.to(dtype), s=size).conj()
    corr = torch.fft.irfft2(spec.sum(0), s=size)  # corr[c, u, v] = sum grad[i, j] * x[i + u, j + v]
    lags = torch.arange(-pad, pad + 1, dilation, device=x.device)
    return corr[:, lags % size[0]][:, :, lags % size[1]].unsqueeze(1)


def dw_conv2d_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, dilation: int,
                       mask: Tuple[bool, bool]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(input gradient, kernel gradient) of ``_conv(x, weight, _, dilation)`` for output gradient ``grad``, the ones
    ``mask`` asks for: the fast CPU methods above, PyTorch's own for 3x3 kernels and on other devices."""
    d, k = dilation, weight.shape[-1]
    pad = [d * (k - 1) // 2] * 2
    if x.device.type != 'cpu' or (k <= 3 and d == 1):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], pad, [d, d], False, [0, 0], weight.shape[0], [mask[0], mask[1], False])
        return grad_x, grad_w
    grad_x = grad_w = None
    if mask[0]:
        grad_x = _conv(_layout(grad, k, d), weight.flip(2, 3), None, d)
    ours = k >= LARGE_KERNEL or (x.shape[-2] * x.shape[-1] <= SMALL_MAP and 5 <= k <= SMALL_MAP_MAX_K)
    if mask[1] and ours:
        grad_w = dw_weight_grad(x.contiguous(), grad.contiguous(), k, d).to(weight.dtype)
    elif mask[1]:
        cl = torch.channels_last
        grad_w = torch.ops.aten.convolution_backward(
            grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl), weight, None, [1, 1], pad, [d, d],
            False, [0, 0], weight.shape[0], [False, True, False])[1]
    return grad_x, grad_w


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int):
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        return _conv(_layout(x, weight.shape[-1], dilation), weight, bias, dilation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x, grad_w = dw_conv2d_backward(x, weight, grad, ctx.dilation, ctx.needs_input_grad[:2])
        grad_b = grad.sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def dense_dilated(weight: torch.Tensor, dilation: int) -> Tuple[torch.Tensor, int]:
    """oneDNN's dilated depth-wise kernels run ~10x below its dense ones: with gradients recorded, a 9x9 kernel with
    dilation 2 is 3x faster as the 17x17 kernel with zeros between its taps (differentiable; gradients reach the
    taps). Returns (kernel, dilation) to run."""
    if dilation > 1 and weight.shape[-1] >= LARGE_KERNEL:
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
    """Depth-wise convolution, stride 1, 'same' padding d * (K - 1) / 2, odd square kernel (C, 1, K, K)."""
    if x.device.type != 'cpu' or (weight.shape[-1] <= 3 and dilation == 1):  # PyTorch's own is fast for 3x3
        return _conv(x, weight, bias, dilation)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _conv(_layout(x, weight.shape[-1], dilation), weight, bias, dilation)
    weight, dilation = dense_dilated(weight, dilation)
    x, weight, bias = autocast_args('cpu', x, weight, bias)
    with torch.autocast('cpu', enabled=False):
        return _DepthwiseConv.apply(x, weight, bias, dilation)
