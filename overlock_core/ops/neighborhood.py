"""Neighbourhood aggregation with NATTEN's ``na2d_av`` semantics, in pure PyTorch.

For every pixel (i, j) a K x K window of values is combined with per-pixel weights. Near the border the window
does not pad: it slides inwards, starting at ``clamp(i - K // 2, 0, L - K)`` (NATTEN's rule), so the map must be
at least K wide in each dimension.

Layouts used throughout (so no permute/copy is needed around the op):
    attn:  (N, K*K, H, W)   window slot a*K + b in the channel position, N = batch * heads; cheapest as the
                            permuted view of an (N, H, W, K*K) tensor (ContMix's layout), any strides work
    value: (N, c, H, W)
    out:   (N, c, H, W)

``na2d_av`` is its own autograd function: forward and backward loop over the K window rows, gather the rows the
windows read once, and turn the column part of the windows into small banded tile matrices, so the work runs as
batched matmuls and never holds a K*K-times copy of the values or of their gradient (transient memory
O(N*H*W*(c + 16 + K)), against the N*H*W*c*K*K of the unfold formulation). Maps with at most 16 distinct windows
(stages 3 and 4 at 224x224, where the map is barely wider than K) take a grouped path instead: one matmul per
distinct window. ``na2d_av_unfold`` is the plain formulation (unfold the windows, replicate-pad the borders,
weighted sum) kept for benchmarks, ``na2d_av_reference`` a direct loop over pixels kept for tests.
"""
import functools
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

__all__ = ['na2d_av', 'na2d_av_reference', 'na2d_av_unfold', 'rpb_bias', 'window_starts']


def window_starts(length: int, kernel_size: int, device=None) -> torch.Tensor:
    """First index of each position's clamped window (NATTEN rule)."""
    if length < kernel_size:
        raise ValueError(f'neighbourhood of size {kernel_size} needs a map at least that wide, got {length}')
    idx = torch.arange(length, device=device)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


def _cached(fn: Callable) -> Callable:
    """Memoise an index builder on its (shape, device) arguments: a block would otherwise rebuild the same index
    tensors from a dozen small ops on every call (a tenth of the dispatches of an inference step). Compiled code
    builds them in the graph instead. Callers must not modify the returned tensors."""
    memo = functools.lru_cache(maxsize=64)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args) if torch.compiler.is_compiling() else memo(*args)
    return wrapper


@_cached
def _window_indices(length: int, kernel_size: int, device) -> torch.Tensor:
    """(K, L) tensor: row a holds the index of window slot a for every position."""
    start = window_starts(length, kernel_size, device)
    return start[None, :] + torch.arange(kernel_size, device=device)[:, None]


def rpb_bias(rpb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Gather a relative-position-bias table (G, 2K-1, 2K-1) into per-pixel logits (G, H*W, K*K), the layout of
    ContMix's logits (pixel-major, window slot a*K + b last).

    The entry used for pixel (i, j) and window slot (a, b) is indexed by the true displacement between key and query,
    ``rpb[g, s_H(i) + a - i + K - 1, s_W(j) + b - j + K - 1]``, so border pixels use other entries than interior ones.
    """
    heads, size, _ = rpb.shape
    k = (size + 1) // 2
    rows, cols = _displacements(height, k, rpb.device), _displacements(width, k, rpb.device)  # (H, K), (W, K)
    flat = (rows[:, None, :, None] * size + cols[None, :, None, :]).reshape(-1)  # (H, W, K, K)
    return rpb.reshape(heads, size * size).index_select(1, flat).reshape(heads, height * width, k * k)


@_cached
def _displacements(length: int, k: int, device) -> torch.Tensor:
    """(L, K): table index (displacement + K - 1) of each window slot from its position, along one axis."""
    return (_window_indices(length, k, device) - torch.arange(length, device=device) + k - 1).t()


TILE = 16  # output columns per band tile
MAX_GROUPS = 16  # maps with at most this many distinct windows aggregate per window (``_na2d_av_grouped``)


class _Tiles:
    """Column tiling of a clamped-window aggregation along W.

    Output columns are cut into tiles of ``TILE``; tile t reads the ``S = TILE + K - 1`` source columns starting at
    ``src0[t]`` (clamped inside the map), which hold every window of its columns. Per image row the window weights
    of a tile form a small banded (TILE x S) matrix, so aggregation and both gradients become batched matmuls of
    size TILE x S instead of K*K element-wise passes (and instead of a full W x W band)."""

    def __init__(self, width: int, ks: int, device):
        self.width, self.ks = width, ks
        self.tile = min(TILE, width)
        self.n = -(-width // self.tile)
        self.padded = self.n * self.tile
        self.span = min(self.tile + ks - 1, width)
        t0 = torch.arange(self.n, device=device) * self.tile
        src0 = (t0 - ks // 2).clamp(0, width - self.span)
        self.src = (src0[:, None] + torch.arange(self.span, device=device)).reshape(-1)  # (n * S,)
        cols = _window_indices(width, ks, device).t()  # (W, K): source column of slot b for output column j
        local = cols - src0.repeat_interleave(self.tile)[:width, None]
        local = torch.cat([local, local.new_zeros(self.padded - width, ks)])  # padded columns: weight 0
        self.local = local.reshape(self.n, self.tile, ks)

    def columns(self, values: torch.Tensor) -> torch.Tensor:
        """(N, H, W, c) values -> (N, H, n*S, c): each tile's source columns, gathered once for all window rows."""
        return values.index_select(2, self.src)

    def blocks(self, columns: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``columns``, the image rows window row ``a`` reads (H,) -> (N*H, n, S, c) source blocks."""
        n, h, _, c = columns.shape
        return columns.index_select(1, rows).reshape(n * h, self.n, self.span, c)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(R, W, X) -> (R, n, TILE, X), zero-padded past the last column."""
        r, w, k = x.shape
        if self.padded > w:
            x = torch.cat([x, x.new_zeros(r, self.padded - w, k)], 1)
        return x.reshape(r, self.n, self.tile, k)

    def band(self, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(R, W, K) window weights -> (R, n, TILE, S) banded matrices, written into ``out`` (one buffer reused
        for every window row: fewer large allocations, less heap growth)."""
        w = self.pad(weights)
        idx = self.local.unsqueeze(0).expand(w.shape[0], -1, -1, -1)
        return out.zero_().scatter_(3, idx, w)


_tiles = _cached(_Tiles)


class _NeighborhoodAV(torch.autograd.Function):
    """One window row ``a`` at a time: the image rows the windows read are gathered once, and the column part of the
    windows becomes banded tile matrices (see ``_Tiles``), so the work runs as batched matmuls. Transient memory per
    step: a few (N, H, W, c)-sized blocks and (N, H, W, TILE + K - 1) bands, never K*K copies of the values."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
        n, c, h, w = value.shape
        ks = kernel_size
        rows = _window_indices(h, ks, value.device)
        tiles = _tiles(w, ks, value.device)
        v_t = value.permute(0, 2, 3, 1).contiguous()  # (N, H, W, c)
        ctx.shape = (n, c, h, w, ks)
        a_px = attn.permute(0, 2, 3, 1)  # (N, H, W, K*K): a view of ContMix's layout, saved without a copy
        a5 = a_px.reshape(n, h, w, ks, ks)
        out = value.new_zeros(n * h, tiles.n, tiles.tile, c)
        cols = tiles.columns(v_t)
        band = value.new_empty(n * h, tiles.n, tiles.tile, tiles.span)
        acc = out.view(-1, tiles.tile, c)  # accumulated in place: no product tensor per window row
        for a in range(ks):
            bands = tiles.band(a5[..., a, :].reshape(n * h, w, ks), band).view(-1, tiles.tile, tiles.span)
            acc.baddbmm_(bands, tiles.blocks(cols, rows[a]).view(-1, tiles.span, c))
        ctx.save_for_backward(a_px, v_t)
        out = out.reshape(n * h, tiles.padded, c)[:, :w]
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        a_px, v_t = ctx.saved_tensors
        n, c, h, w, ks = ctx.shape
        rows = _window_indices(h, ks, v_t.device)
        tiles = _tiles(w, ks, v_t.device)
        g_blk = tiles.pad(grad_out.permute(0, 2, 3, 1).reshape(n * h, w, c))  # (NH, n, TILE, c)
        need_attn, need_value = ctx.needs_input_grad[:2]
        a5 = a_px.reshape(n, h, w, ks, ks)
        grad5 = v_t.new_empty(n, h, w, ks, ks) if need_attn else None  # written in place, in attn's layout
        grad_v = torch.zeros_like(v_t) if need_value else None
        idx = tiles.local.unsqueeze(0).expand(n * h, -1, -1, -1)
        cols = tiles.columns(v_t) if need_attn else None
        band = v_t.new_empty(n * h, tiles.n, tiles.tile, tiles.span)  # buffers reused for every window row
        pair = v_t.new_empty(n * h, tiles.n, tiles.tile, tiles.span) if need_attn else None
        g_src = v_t.new_empty(n * h, tiles.n, tiles.span, c) if need_value else None
        g_rows = v_t.new_empty(n * h, w, c) if need_value else None
        for a in range(ks):
            if need_attn:
                torch.matmul(g_blk, tiles.blocks(cols, rows[a]).transpose(2, 3), out=pair)  # (NH, n, TILE, S)
                grad5[..., a, :] = pair.gather(3, idx).reshape(n * h, tiles.padded, ks)[:, :w].reshape(n, h, w, ks)
            if need_value:
                bands = tiles.band(a5[..., a, :].reshape(n * h, w, ks), band)
                torch.matmul(bands.transpose(2, 3), g_blk, out=g_src)  # (NH, n, S, c)
                g_rows.zero_().index_add_(1, tiles.src, g_src.view(n * h, -1, c))
                grad_v.index_add_(1, rows[a], g_rows.view(n, h, w, c))
        grad_attn = grad5.reshape(n, h, w, ks * ks).permute(0, 3, 1, 2) if need_attn else None
        grad_value = grad_v.permute(0, 3, 1, 2).contiguous() if need_value else None
        return grad_attn, grad_value, None


def _check(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    if attn.dim() != 4 or value.dim() != 4 or attn.shape[0] != value.shape[0] or attn.shape[2:] != value.shape[2:] \
            or attn.shape[1] != kernel_size * kernel_size:
        raise ValueError(f'na2d_av expects attn (N, K*K, H, W) and value (N, c, H, W) with K={kernel_size}, '
                         f'got {tuple(attn.shape)} and {tuple(value.shape)}')


def _runs(length: int, kernel_size: int):
    """(window start, first, end) of each run of positions sharing one clamped window: the first K//2 + 1
    positions share start 0, the last K//2 + 1 share start L - K, interior positions have their own."""
    last, r = length - kernel_size, kernel_size // 2
    return [(s, 0 if s == 0 else s + r, length if s == last else s + r + 1) for s in range(last + 1)]


def _na2d_av_grouped(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Maps barely wider than K (stage 3 and 4 at 224x224) have few distinct windows: (H-K+1) x (W-K+1), 1 to 16.
    Each group of pixels sharing a window is one matmul of that window's values (N, c, K*K) with the group's weights,
    so nothing is scattered and no window is copied more than once (transient memory <= 16 N c K*K).
    Plain autograd: ``split`` backs up as one concatenation, the overlapping windows' slices as sums."""
    n, c, h, w = value.shape
    ks = kernel_size
    row_runs, col_runs = _runs(h, ks), _runs(w, ks)
    weights = attn.permute(0, 2, 3, 1)  # (N, H, W, K*K): a free view of ContMix's layout
    out_rows = []
    for (sr, i0, i1), row_w in zip(row_runs, weights.split([i1 - i0 for _, i0, i1 in row_runs], 1)):
        out_cols = []
        for (sc, j0, j1), blk in zip(col_runs, row_w.split([j1 - j0 for _, j0, j1 in col_runs], 2)):
            window = value[:, :, sr:sr + ks, sc:sc + ks].reshape(n, c, ks * ks)
            out = torch.matmul(window, blk.reshape(n, -1, ks * ks).mT)  # (N, c, pixels of the group)
            out_cols.append(out.reshape(n, c, i1 - i0, j1 - j0))
        out_rows.append(torch.cat(out_cols, 3))
    return torch.cat(out_rows, 2)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Memory-lean neighbourhood aggregation (see module docstring for layouts)."""
    _check(attn, value, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f'na2d_av needs an odd kernel size, got {kernel_size}')
    attn = attn.to(value.dtype)
    n, c, h, w = value.shape
    if (h - kernel_size + 1) * (w - kernel_size + 1) <= MAX_GROUPS:
        return _na2d_av_grouped(attn, value, kernel_size)
    return _NeighborhoodAV.apply(attn, value.contiguous(), kernel_size)


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
