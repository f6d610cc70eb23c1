"""Neighbourhood aggregation with NATTEN's ``na2d_av`` semantics, in pure PyTorch.

For every pixel (i, j) a K x K window of values is combined with per-pixel weights. Near the border the window
does not pad: it slides inwards, starting at ``clamp(i - K // 2, 0, L - K)`` (NATTEN's rule), so the map must be
at least K wide in each dimension.

Layouts used throughout (so no permute/copy is needed around the op):
    attn:  (N, K*K, H, W)   window slot a*K + b in the channel position, N = batch * heads
    value: (N, c, H, W)
    out:   (N, c, H, W)

``na2d_av`` is its own autograd function: forward and backward loop over the K window rows, gather the rows the
windows read once, and turn the column part of the windows into banded matrices, so the work runs as batched
matmuls and never holds a K*K-times copy of the values or of their gradient (transient memory O(N*H*W*(c + W)),
below the N*H*W*K*K of the unfold formulation whenever the map is narrower than K*K). ``na2d_av_unfold`` is the plain formulation (unfold the windows, replicate-pad the
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


def _band(rows_weights: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """Scatter per-pixel weights (R, W, K) into banded matrices (R, W, W): entry [j, cols[b, j]] = weight[j, b]."""
    r, w, k = rows_weights.shape
    band = rows_weights.new_zeros(r, w, width)
    return band.scatter_(2, cols.t().unsqueeze(0).expand(r, w, k), rows_weights)


class _NeighborhoodAV(torch.autograd.Function):
    """One window row ``a`` at a time: the rows the windows read are gathered once (an (N, H, W, c) copy), and the
    column part of the window becomes a banded (W x W) matrix per image row, so aggregation and both gradients are
    batched matmuls (GEMM speed) instead of K*K element-wise passes. Transient memory: one (N, H, W, c) copy and
    one (N, H, W, W) band, never K*K copies of the values."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
        n, c, h, w = value.shape
        ks = kernel_size
        rows = _window_indices(h, ks, value.device)
        cols = _window_indices(w, ks, value.device)
        v_t = value.permute(0, 2, 3, 1).contiguous()  # (N, H, W, c)
        a_t = attn.reshape(n, ks, ks, h, w).permute(1, 0, 3, 4, 2).contiguous()  # (K_rows, N, H, W, K_cols)
        out = value.new_zeros(n * h, w, c)
        for a in range(ks):
            v_rows = v_t.index_select(1, rows[a]).reshape(n * h, w, c)
            out.baddbmm_(_band(a_t[a].reshape(n * h, w, ks), cols, w), v_rows)
        ctx.save_for_backward(a_t, v_t)
        ctx.shape = (n, c, h, w, ks)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        a_t, v_t = ctx.saved_tensors
        n, c, h, w, ks = ctx.shape
        rows = _window_indices(h, ks, v_t.device)
        cols = _window_indices(w, ks, v_t.device)
        g_t = grad_out.permute(0, 2, 3, 1).reshape(n * h, w, c)
        need_attn, need_value = ctx.needs_input_grad[:2]
        grad_a = torch.empty_like(a_t) if need_attn else None
        grad_v = torch.zeros_like(v_t) if need_value else None
        col_idx = cols.t().unsqueeze(0).expand(n * h, w, ks)
        for a in range(ks):
            if need_attn:
                v_rows = v_t.index_select(1, rows[a]).reshape(n * h, w, c)
                pair = torch.bmm(g_t, v_rows.transpose(1, 2))  # (NH, W, W): <grad_out[j], value[j']>
                grad_a[a] = pair.gather(2, col_idx).reshape(n, h, w, ks)
            if need_value:
                band = _band(a_t[a].reshape(n * h, w, ks), cols, w)
                grad_v.index_add_(1, rows[a], torch.bmm(band.transpose(1, 2), g_t).reshape(n, h, w, c))
        grad_attn = grad_a.permute(1, 0, 4, 2, 3).reshape(n, ks * ks, h, w) if need_attn else None
        grad_value = grad_v.permute(0, 3, 1, 2).contiguous() if need_value else None
        return grad_attn, grad_value, None


def _check(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    if attn.dim() != 4 or value.dim() != 4 or attn.shape[0] != value.shape[0] or attn.shape[2:] != value.shape[2:] \
            or attn.shape[1] != kernel_size * kernel_size:
        raise ValueError(f'na2d_av expects attn (N, K*K, H, W) and value (N, c, H, W) with K={kernel_size}, '
                         f'got {tuple(attn.shape)} and {tuple(value.shape)}')


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Memory-lean neighbourhood aggregation (see module docstring for layouts)."""
    _check(attn, value, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f'na2d_av needs an odd kernel size, got {kernel_size}')
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
