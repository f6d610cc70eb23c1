"""Neighbourhood aggregation with NATTEN's ``na2d_av`` semantics, in pure PyTorch.

For every pixel (i, j) a K x K window of values is combined with per-pixel weights. Near the border the window
does not pad: it slides inwards, starting at ``clamp(i - K // 2, 0, L - K)`` (NATTEN's rule), so the map must be
at least K wide in each dimension.

Layouts used throughout (so no permute/copy is needed around the op):
    attn:  (N, K*K, H, W)   window slot a*K + b in the channel position, N = batch * heads
    value: (N, c, H, W)
    out:   (N, c, H, W)

``na2d_av`` is its own autograd function: forward and backward loop over the K*K window offsets and gather one
shifted view of the values at a time, so they never hold a K*K-times copy of the values or of their gradient
(memory O(N*(c + K*K)*H*W)). ``na2d_av_unfold`` is the plain formulation (unfold the windows, replicate-pad the
borders, weighted sum) kept for benchmarks, ``na2d_av_reference`` a direct loop over pixels kept for tests.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['na2d_av', 'na2d_av_reference', 'na2d_av_unfold', 'rpb_bias', 'window_starts']


def window_starts(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """First index of each position's clamped window (NATTEN rule)."""
    if length < kernel_size:
        raise ValueError(f'neighbourhood of size {kernel_size} needs a map at least that wide, got {length}')
    idx = torch.arange(length, device=device)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


def _window_indices(length: int, kernel_size: int, device) -> torch.Tensor:
    """(K, L) tensor: row a holds the index of window slot a for every position."""
    start = window_starts(length, kernel_size, device)
    return start[None, :] + torch.arange(kernel_size, device=device)[:, None]


def rpb_bias(rpb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gather a relative-position-bias table (G, 2K-1, 2K-1) into per-pixel logits (G, K*K, H, W).

    The entry used for pixel (i, j) and window slot (a, b) is indexed by the true displacement between key and query,
    ``rpb[g, s_H(i) + a - i + K - 1, s_W(j) + b - j + K - 1]``, so border pixels use other entries than interior ones.
    """
    heads, size, _ = rpb.shape
    k = (size + 1) // 2
    rows = _window_indices(height, k, rpb.device) - torch.arange(height, device=rpb.device) + k - 1  # (K, H)
    cols = _window_indices(width, k, rpb.device) - torch.arange(width, device=rpb.device) + k - 1  # (K, W)
    flat = (rows[:, None, :, None] * size + cols[None, :, None, :]).reshape(k * k, height * width)
    return rpb.reshape(heads, size * size)[:, flat].reshape(heads, k * k, height, width)


class _NeighborhoodAV(torch.autograd.Function):

    @staticmethod
    def forward(ctx, attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
        n, c, h, w = value.shape
        rows = _window_indices(h, kernel_size, value.device)
        cols = _window_indices(w, kernel_size, value.device)
        out = torch.zeros_like(value)
        for a in range(kernel_size):
            v_rows = value.index_select(2, rows[a])
            for b in range(kernel_size):
                out.addcmul_(v_rows.index_select(3, cols[b]), attn[:, a * kernel_size + b].unsqueeze(1))
        ctx.save_for_backward(attn, value)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        attn, value = ctx.saved_tensors
        ks = ctx.kernel_size
        n, c, h, w = value.shape
        rows = _window_indices(h, ks, value.device)
        cols = _window_indices(w, ks, value.device)
        grad_out = grad_out.contiguous()
        grad_attn = torch.empty_like(attn) if ctx.needs_input_grad[0] else None
        grad_value = torch.zeros_like(value) if ctx.needs_input_grad[1] else None
        for a in range(ks):
            v_rows = value.index_select(2, rows[a]) if grad_attn is not None else None
            g_rows = torch.zeros_like(value) if grad_value is not None else None
            for b in range(ks):
                slot = a * ks + b
                if grad_attn is not None:
                    grad_attn[:, slot] = (grad_out * v_rows.index_select(3, cols[b])).sum(1)
                if g_rows is not None:
                    g_rows.index_add_(3, cols[b], grad_out * attn[:, slot].unsqueeze(1))
            if grad_value is not None:
                grad_value.index_add_(2, rows[a], g_rows)
        return grad_attn, grad_value, None


def _check(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    if attn.dim() != 4 or value.dim() != 4 or attn.shape[0] != value.shape[0] or attn.shape[2:] != value.shape[2:] \
            or attn.shape[1] != kernel_size * kernel_size:
        raise ValueError(f'na2d_av expects attn (N, K*K, H, W) and value (N, c, H, W) with K={kernel_size}, '
                         f'got {tuple(attn.shape)} and {tuple(value.shape)}')


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Memory-lean neighbourhood aggregation (see module docstring for layouts)."""
    _check(attn, value, kernel_size)
    attn = attn.to(value.dtype)
    return _NeighborhoodAV.apply(attn.contiguous(), value.contiguous(), kernel_size)


def na2d_av_unfold(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The plain formulation: all K*K windows materialised (the authors' natten-free fallback does this)."""
    _check(attn, value, kernel_size)
    n, c, h, w = value.shape
    k = kernel_size
    windows = F.unfold(value, k).reshape(n, c * k * k, h - k + 1, w - k + 1)
    windows = F.pad(windows, (k // 2, k // 2, k // 2, k // 2), mode='replicate')
    return (windows.reshape(n, c, k * k, h, w) * attn.to(value.dtype).unsqueeze(1)).sum(2)


def na2d_av_reference(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Brute-force loop over pixels: the definition, for tests only."""
    _check(attn, value, kernel_size)
    n, c, h, w = value.shape
    k = kernel_size
    sh, sw = window_starts(h, k).tolist(), window_starts(w, k).tolist()
    out = torch.zeros_like(value)
    for i in range(h):
        for j in range(w):
            win = value[:, :, sh[i]:sh[i] + k, sw[j]:sw[j] + k].reshape(n, c, k * k)
            out[:, :, i, j] = (win * attn[:, :, i, j].unsqueeze(1)).sum(-1)
    return out
