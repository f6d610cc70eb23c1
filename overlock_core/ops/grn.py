"""ConvNeXt-V2 global response norm as one autograd function.

y = x * (gamma * nx + 1) + beta, nx = ||x||_hw / mean_c ||x||_hw. Autograd through the composite builds five
full-size passes in the backward (norm, division, broadcasts); the closed form below needs two: one reduction
sum_hw(g * x) and one fused ``g * A + x * B`` with per-(image, channel) A and B. Norms, means and the small
per-channel algebra run in fp32 (in fp16 the sum of squares of a large map overflows).
"""
from typing import Tuple

import torch

from ..export import plain_ops_active

__all__ = ['grn', 'grn_backward', 'grn_forward', 'grn_plain', 'grn_scale']


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


CHUNK = 1 << 18  # elements per chunk of the per-channel sums on channels-last maps (1 MiB in fp32: in cache)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t contiguous, channels-last if ``like`` is: custom operators' outputs and their fake twins agree on strides."""
    return t.contiguous(memory_format=torch.channels_last if _channels_last(like) else torch.contiguous_format)


def _dot_hw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over H, W of a * b per (image, channel), (N, C, 1, 1) in fp32 or wider. On channels-last maps the
    (N, HW, C) rows go in cache-sized chunks: a full-size product costs an allocation (page faults on a fresh
    mapping) and a pass through memory."""
    n, c, h, w = a.shape
    if not (_channels_last(a) and _channels_last(b)):
        return (a * b).sum((2, 3), keepdim=True, dtype=_acc(a))
    acc = torch.zeros(n, c, dtype=_acc(a), device=a.device)
    step = max(1, CHUNK // (n * c))
    rows_a, rows_b = (t.permute(0, 2, 3, 1).reshape(n, h * w, c) for t in (a, b))
    for pa, pb in zip(rows_a.split(step, dim=1), rows_b.split(step, dim=1)):
        acc += (pa * pb).sum(1, dtype=acc.dtype)
    return acc.view(n, c, 1, 1)


def _stats(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if _channels_last(x):  # the norm kernel reduces channels-last maps strided, ~10x slower than a sum of squares
        gx = _dot_hw(x, x).sqrt()
    else:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True, dtype=_acc(x))
    return gx, gx.mean(dim=1, keepdim=True) + eps


def grn_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, inplace: bool = False):
    """(y, gx, mean): the output and the per-(image, channel) norms the backward needs; ``inplace`` writes y into x
    (a tensor the caller owns and no longer needs)."""
    gx, mean = _stats(x, eps)
    scale = grn_scale(gamma, gx, mean).to(x.dtype)
    if inplace:
        return x.mul_(scale).add_(beta.to(x.dtype)), gx, mean
    return torch.addcmul(beta.to(x.dtype), x, scale), gx, mean


def grn_scale(gamma: torch.Tensor, gx: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The per-(image, channel) factor A of y = x * A + beta."""
    return gamma.to(gx.dtype) * (gx / mean) + 1


def grn_backward(g: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, gx: torch.Tensor, mean: torch.Tensor,
                 inplace: bool = False):
    """(grad_x, grad_gamma, grad_beta) in closed form; ``inplace`` writes grad_x into g (a tensor the caller owns)."""
    nx = gx / mean
    s = _dot_hw(g, x).to(gx.dtype)  # dL/d(scale), (N, C, 1, 1)
    grad_gamma = (s * nx).sum(0, keepdim=True).to(gamma.dtype)
    grad_beta = g.sum((0, 2, 3), keepdim=True, dtype=gx.dtype).to(gamma.dtype)
    dnx = s * gamma.to(gx.dtype)
    # nx_c = gx_c / (mean_k gx_k + eps)  =>  dgx_c = dnx_c / m - sum_k(dnx_k gx_k) / (m^2 C)
    dgx = dnx / mean - (dnx * gx).sum(1, keepdim=True) / (mean * mean * gx.shape[1])
    coef = torch.where(gx > 0, dgx / gx.clamp_min(torch.finfo(gx.dtype).tiny), torch.zeros_like(gx))
    scale = grn_scale(gamma, gx, mean).to(g.dtype)
    grad_x = (g.mul_(scale) if inplace else g * scale).addcmul_(x, coef.to(x.dtype))
    return grad_x, grad_gamma, grad_beta


class _GRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        y, gx, mean = grn_forward(x, gamma, beta, eps)
        ctx.save_for_backward(x, gamma, gx, mean)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return *grn_backward(g, *ctx.saved_tensors), None


def grn_plain(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``grn`` in standard operators (no autograd function, no layout-dependent path): the export form."""
    gx = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True, dtype=_acc(x))
    scale = grn_scale(gamma, gx, gx.mean(dim=1, keepdim=True) + eps).to(x.dtype)
    return torch.addcmul(beta.to(x.dtype), x, scale)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Global response norm of x (N, C, H, W) with gamma, beta (1, C, 1, 1); ``grn_plain`` while exported."""
    fn = grn_plain if plain_ops_active() else _GRN.apply
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, gamma, beta, eps)
    return fn(x, gamma, beta, eps)
