"""Neighbourhood aggregation with NATTEN's ``na2d_av`` semantics in PyTorch, and ContMix's dynamic step built on it.

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
distinct window. On GPUs both passes are fused Triton kernels instead (``triton_av``); ContMix's whole step
(``kernel_av``) runs on CPUs as fused C++ kernels (``cpu_ext``, built on first use) where they build. ``na2d_av_unfold`` is
the plain formulation (unfold the windows, replicate-pad the borders, weighted sum) kept for benchmarks,
``na2d_av_reference`` a direct loop over pixels kept for tests. ``kernel_av`` is ContMix's whole dynamic step
(soft-maxed kernel with its relative-position bias, then the aggregation) as one function that recomputes the
kernel in the backward instead of keeping it; under ``torch.compile`` it is the custom operator pair
``overlock::kernel_av`` / ``overlock::kernel_av_backward``.
"""
import functools
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

from ..export import plain_ops_active
from . import cpu_ext, triton_av
from .dwconv import autocast_args
from .grn import _laid_out_like

__all__ = ['kernel_av', 'kernel_av_plain', 'na2d_av', 'na2d_av_reference', 'na2d_av_unfold', 'rpb_bias',
           'window_starts']


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


def rpb_bias(rpb: torch.Tensor, height: int, width: int, grouped: bool = False) -> torch.Tensor:
    """Gather a relative-position-bias table (G, 2K-1, 2K-1) into per-pixel logits (G, H*W, K*K), the layout of
    ContMix's logits (pixel-major, window slot a*K + b last; pixels in the grouped path's order if ``grouped``).

    The entry used for pixel (i, j) and window slot (a, b) is indexed by the true displacement between key and query,
    ``rpb[g, s_H(i) + a - i + K - 1, s_W(j) + b - j + K - 1]``, so border pixels use other entries than interior ones.
    """
    heads, size, _ = rpb.shape
    k = (size + 1) // 2
    flat = _rpb_index(height, width, k, rpb.device, grouped)
    return rpb.reshape(heads, size * size).index_select(1, flat).reshape(heads, height * width, k * k)


@_cached
def _rpb_index(height: int, width: int, k: int, device, grouped: bool = False) -> torch.Tensor:
    """(H*W*K*K,) flat table index of every (pixel, window slot) pair (see ``rpb_bias``); pixels in the grouped
    path's order (``_group_order``) if ``grouped``."""
    rows, cols = _displacements(height, k, device), _displacements(width, k, device)  # (H, K), (W, K)
    flat = rows[:, None, :, None] * (2 * k - 1) + cols[None, :, None, :]  # (H, W, K, K)
    if grouped:
        return _pick(flat.reshape(height * width, k * k), 0, _group_order(height, width, k, device)[0]).reshape(-1)
    return flat.reshape(-1)


@_cached
def _displacements(length: int, k: int, device) -> torch.Tensor:
    """(L, K): table index (displacement + K - 1) of each window slot from its position, along one axis."""
    return (_window_indices(length, k, device) - torch.arange(length, device=device) + k - 1).t()


TILE = 16  # output columns per band tile
MAX_GROUPS = 16  # maps with at most this many distinct windows aggregate per window (``_grouped_forward``)


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


def _channels_last_values(value: torch.Tensor) -> torch.Tensor:
    """(N, c, H, W) -> contiguous (N, H, W, c): the tiled path's form of the values, kept for its backward."""
    return value.permute(0, 2, 3, 1).contiguous()


def _tiled_forward(attn: torch.Tensor, value: torch.Tensor, ks: int):
    """One window row ``a`` at a time: the image rows the windows read are gathered once, and the column part of the
    windows becomes banded tile matrices (see ``_Tiles``), so the work runs as batched matmuls. Transient memory per
    step: a few (N, H, W, c)-sized blocks and (N, H, W, TILE + K - 1) bands, never K*K copies of the values.
    Returns the output and what the backward needs: attn (not copied) and the values channels-last."""
    n, c, h, w = value.shape
    rows = _window_indices(h, ks, value.device)
    tiles = _tiles(w, ks, value.device)
    v_t = _channels_last_values(value)
    a5 = attn.permute(0, 2, 3, 1).reshape(n, h, w, ks, ks)  # a view of ContMix's (N, H, W, K*K) layout
    out = value.new_zeros(n * h, tiles.n, tiles.tile, c)
    cols = tiles.columns(v_t)
    band = value.new_empty(n * h, tiles.n, tiles.tile, tiles.span)
    acc = out.view(-1, tiles.tile, c)  # accumulated in place: no product tensor per window row
    for a in range(ks):
        bands = tiles.band(a5[..., a, :].reshape(n * h, w, ks), band).view(-1, tiles.tile, tiles.span)
        acc.baddbmm_(bands, tiles.blocks(cols, rows[a]).view(-1, tiles.span, c))
    out = out.reshape(n * h, tiles.padded, c)[:, :w]
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous(), (attn, v_t)


def _tiled_backward(saved: Tuple[torch.Tensor, ...], grad_out: torch.Tensor, ks: int, need: Tuple[bool, bool]):
    attn, v_t = saved
    n, h, w, c = v_t.shape
    rows = _window_indices(h, ks, v_t.device)
    tiles = _tiles(w, ks, v_t.device)
    g_blk = tiles.pad(grad_out.permute(0, 2, 3, 1).reshape(n * h, w, c))  # (NH, n, TILE, c)
    need_attn, need_value = need
    a5 = attn.permute(0, 2, 3, 1).reshape(n, h, w, ks, ks)
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
    return grad_attn, grad_value


def _bias(rpb: torch.Tensor, pb: torch.Tensor, h: int, w: int, grouped: bool = False) -> torch.Tensor:
    """The gathered relative-position bias plus the projection bias (``rpb_bias``): as large as the kernel of one
    image, and transient."""
    return rpb_bias(rpb, h, w, grouped).add_(pb)


def _softmax_kernel(q: torch.Tensor, kw: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q @ kw + bias) over the window slots, in the bias's dtype (>= fp32): (B, G, P, K*K)."""
    return torch.matmul(q, kw).to(bias.dtype).add_(bias).softmax(dim=-1)


def _as_attn(kernel: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, G, HW, K*K) -> the (B*G, K*K, H, W) view the aggregation reads."""
    b, g, _, kk = kernel.shape
    return kernel.to(dtype).reshape(b * g, h, w, kk).permute(0, 3, 1, 2)


def _grouped_kernel_av(q, kw, bias, value, ks):
    """``kernel_av``'s forward on the grouped path, one group of pixels at a time: the group's kernel rows
    (B, G, P, K*K), computed from its rows of q (``q`` and ``bias`` in group order), aggregate its window at
    once, so the whole kernel is never formed (a quarter of it at a time at stage 3: it stays in cache)."""
    n, c, h, w = value.shape
    out = value.new_empty(n, c, h, w)
    for first, end, rows, cols, wr, wc in _group_order(h, w, ks, value.device)[2]:
        kernel = _softmax_kernel(q[:, :, first:end], kw, bias[:, first:end]).to(value.dtype)
        window = value[:, :, wr, wc].reshape(n, c, ks * ks)
        out[:, :, rows, cols] = torch.matmul(window, kernel.view(n, -1, ks * ks).mT).view(
            n, c, rows.stop - rows.start, cols.stop - cols.start)
    return out


def _grouped_kernel_av_backward(q, kw, bias, value, grad_out, ks, need):
    """The backward of ``_grouped_kernel_av``, group by group as well: (grad q in group order, grad kw, grad bias
    (G, HW, K*K) in group order, grad value), each None unless ``need`` (q, kw, bias, value) asks for it."""
    n, c, h, w = value.shape
    grad_q, grad_kw = torch.empty_like(q) if need[0] else None, None
    grad_bias = bias.new_empty(bias.shape) if need[2] else None
    grad_v = torch.zeros_like(value) if need[3] else None
    for first, end, rows, cols, wr, wc in _group_order(h, w, ks, value.device)[2]:
        q_g = q[:, :, first:end]
        kernel = _softmax_kernel(q_g, kw, bias[:, first:end])  # recomputed
        g = grad_out[:, :, rows, cols].reshape(n, c, -1)  # (N, c, P)
        grad_kernel = torch.matmul(g.mT, value[:, :, wr, wc].reshape(n, c, ks * ks)).view(kernel.shape)
        if need[3]:
            grad_v[:, :, wr, wc] += torch.matmul(g, kernel.to(value.dtype).view(n, -1, ks * ks)).view(n, c, ks, ks)
        grad_logits = torch._softmax_backward_data(grad_kernel.to(kernel.dtype), kernel, -1, kernel.dtype)
        del kernel, grad_kernel
        if need[2]:
            grad_bias[:, first:end] = grad_logits.sum(0)
        grad_logits = grad_logits.to(q.dtype)
        if need[0]:
            grad_q[:, :, first:end] = torch.matmul(grad_logits, kw.mT)
        if need[1]:
            part = torch.matmul(q_g.mT, grad_logits)
            grad_kw = part if grad_kw is None else grad_kw.add_(part)
    return grad_q, grad_kw, grad_bias, grad_v


def _kernel_av_path(value: torch.Tensor, ks: int) -> str:
    """Which formulation ``kernel_av`` takes for these values: 'fused', the C++ kernels of ``cpu_ext`` (CPU, fp32 or
    fp64, more than one window; 1.3-6x faster than the PyTorch formulations at the variants' shapes), 'grouped'
    (few distinct windows, no Triton), or 'plain' (the kernel formed, then ``av_forward``: Triton kernels on GPUs,
    tiles on the CPU)."""
    h, w = value.shape[-2:]
    if triton_av.available(value):
        return 'plain'
    if value.device.type == 'cpu' and value.dtype in (torch.float32, torch.float64) and (h, w) != (ks, ks) \
            and cpu_ext.get() is not None:
        return 'fused'
    return 'grouped' if _grouped(h, w, ks) else 'plain'


def _fused_args(q, kw, rpb, pb, value, ks):
    """The fused kernels' inputs, contiguous in the values' dtype: q as (B, G, d, HW), kw, the gathered bias
    (G, HW, K*K), the values."""
    dt, (h, w) = value.dtype, value.shape[-2:]
    return (q.mT.to(dt).contiguous(), kw.to(dt).contiguous(), _bias(rpb, pb, h, w).to(dt).contiguous(),
            value.contiguous())


def _kernel_av_forward(q, kw, rpb, pb, value, ks):
    """The output of ``kernel_av``, on the path ``_kernel_av_path`` picks."""
    h, w = value.shape[-2:]
    path = _kernel_av_path(value, ks)
    if path == 'fused':
        return cpu_ext.load().forward(*_fused_args(q, kw, rpb, pb, value, ks), ks)
    if path == 'grouped':
        order = _group_order(h, w, ks, q.device)[0]
        return _grouped_kernel_av(_pick(q, 2, order), kw, _bias(rpb, pb, h, w, True), value, ks)
    kernel = _softmax_kernel(q, kw, _bias(rpb, pb, h, w))
    return av_forward(_as_attn(kernel, h, w, value.dtype), value, ks)[0]


def _kernel_av_backward(q, kw, rpb, pb, v, grad_out, ks, need, path):
    """The gradients of ``kernel_av``'s five tensor inputs that ``need`` asks for (None for the others); ``path`` is
    ``_kernel_av_path``'s, v the values (``av_kept_values`` of them on the 'plain' path)."""
    h, w = grad_out.shape[-2:]
    need_bias = need[2] or need[3]
    if path == 'fused':
        args = _fused_args(q, kw, rpb, pb, v, ks)
        gq, gkw, grad_bias, grad_value = cpu_ext.load().backward(*args, grad_out.to(v.dtype).contiguous(), ks)
        grad_q = gq.mT.to(q.dtype) if need[0] else None
        grad_kw = gkw.to(kw.dtype) if need[1] else None
        grad_value = grad_value if need[4] else None
    elif path == 'grouped':
        order, inverse, _ = _group_order(h, w, ks, q.device)
        grad_q, grad_kw, grad_bias, grad_value = _grouped_kernel_av_backward(
            _pick(q, 2, order), kw, _bias(rpb, pb, h, w, True), v, grad_out, ks,
            (need[0], need[1], need_bias, need[4]))
        grad_q = None if grad_q is None else _pick(grad_q, 2, inverse)  # back to pixel order
    else:
        kernel = _softmax_kernel(q, kw, _bias(rpb, pb, h, w))  # recomputed
        grad_attn, grad_value = av_backward((_as_attn(kernel, h, w, v.dtype), v), grad_out, ks, (True, need[4]))
        grad_kernel = grad_attn.permute(0, 2, 3, 1).reshape(kernel.shape).to(kernel.dtype)  # attn's layout
        grad_logits = torch._softmax_backward_data(grad_kernel, kernel, -1, kernel.dtype)
        del kernel, grad_kernel
        grad_bias = grad_logits.sum(0) if need_bias else None  # (G, HW, K*K)
        grad_logits = grad_logits.to(q.dtype)
        grad_q = torch.matmul(grad_logits, kw.mT) if need[0] else None
        grad_kw = torch.matmul(q.mT, grad_logits) if need[1] else None
    grad_rpb = grad_pb = None
    if need_bias:
        grad_bias = grad_bias.to(rpb.dtype)
        grad_pb = grad_bias.sum((0, 1))
        flat = _rpb_index(h, w, ks, rpb.device, path == 'grouped')
        grad_rpb = torch.zeros_like(rpb).view(rpb.shape[0], -1).index_add_(
            1, flat, grad_bias.view(rpb.shape[0], -1)).view_as(rpb)
    return grad_q, grad_kw, grad_rpb, grad_pb, grad_value


# ContMix's dynamic kernel and its aggregation as custom operators with a registered backward, one mechanism for
# eager mode and torch.compile (traced, the per-group loops would unroll into thousands of graph nodes and the GPU's
# Triton kernels would not be used). The kernel (B*G*H*W*K*K values, ten times the aggregated values at K=13) is
# recomputed in the backward from q and kw, not kept. On CPUs the fused C++ kernels (``cpu_ext``) do both passes
# pixel by pixel; without them, on the grouped path the pixels are listed group by group (q's rows reordered, the
# bias gathered in that order), and both passes work one group at a time (``_grouped_kernel_av``).
@torch.library.custom_op('overlock::kernel_av', mutates_args=())
def _kernel_av_op(q: torch.Tensor, kw: torch.Tensor, rpb: torch.Tensor, pb: torch.Tensor, value: torch.Tensor,
                  ks: int) -> torch.Tensor:
    return _laid_out_like(_kernel_av_forward(q, kw, rpb, pb, value, ks), value)


@_kernel_av_op.register_fake
def _(q, kw, rpb, pb, value, ks):
    return _laid_out_like(value.new_empty(value.shape), value)


@torch.library.custom_op('overlock::kernel_av_backward', mutates_args=())
def _kernel_av_backward_op(q: torch.Tensor, kw: torch.Tensor, rpb: torch.Tensor, pb: torch.Tensor,
                           value: torch.Tensor, grad_out: torch.Tensor, ks: int,
                           need: List[bool]) -> List[torch.Tensor]:
    path = _kernel_av_path(value, ks)
    kept = av_kept_values(value, ks) if path == 'plain' else value
    grads = _kernel_av_backward(q, kw, rpb, pb, kept, grad_out, ks, need, path)
    return [t.new_empty(0) if g is None else g.to(t.dtype).contiguous()
            for g, t in zip(grads, (q, kw, rpb, pb, value))]


@_kernel_av_backward_op.register_fake
def _(q, kw, rpb, pb, value, grad_out, ks, need):
    return [t.new_empty(t.shape if n else 0) for t, n in zip((q, kw, rpb, pb, value), need)]


def _kernel_av_op_setup(ctx, inputs, output):
    *tensors, ctx.ks = inputs
    ctx.save_for_backward(*tensors)


def _kernel_av_op_backward(ctx, grad_out):
    need = list(ctx.needs_input_grad[:5])
    grads = torch.ops.overlock.kernel_av_backward(*ctx.saved_tensors, grad_out, ctx.ks, need)
    return *(g if n else None for g, n in zip(grads, need)), None


_kernel_av_op.register_autograd(_kernel_av_op_backward, setup_context=_kernel_av_op_setup)


def kernel_av(q: torch.Tensor, kw: torch.Tensor, rpb: torch.Tensor, pb: torch.Tensor, value: torch.Tensor,
              kernel_size: int) -> torch.Tensor:
    """na2d_av(softmax(q @ kw + rpb_bias(rpb) + pb), value) without keeping the kernel or the gathered bias: q (B, G,
    HW, d), kw (B, G, d, K*K), rpb (G, 2K-1, 2K-1), pb (K*K,) (both >= fp32: the softmax runs in their dtype),
    value (B*G, c, H, W) -> (B*G, c, H, W)."""
    b, g, hw, _ = q.shape
    if value.shape[0] != b * g or value.shape[-2] * value.shape[-1] != hw or kw.shape[-1] != kernel_size ** 2:
        raise ValueError(f'kernel_av: q {tuple(q.shape)}, kw {tuple(kw.shape)} and value {tuple(value.shape)} '
                         f'do not fit K={kernel_size}')
    dev = value.device.type
    q, kw = autocast_args(dev, q, kw)
    with torch.autocast(dev, enabled=False):
        if plain_ops_active():  # exported or traced: standard operators only
            return kernel_av_plain(q, kw, rpb, pb, value, kernel_size)
        return torch.ops.overlock.kernel_av(q, kw, rpb, pb, value, kernel_size)


def _plain_windows(length, kernel_size: int, device) -> torch.Tensor:
    """``_window_indices`` in tensor operators on a possibly symbolic length (no cache, no size test)."""
    start = (torch.arange(length, device=device) - kernel_size // 2).clamp(0, length - kernel_size)
    return start[None, :] + torch.arange(kernel_size, device=device)[:, None]


def kernel_av_plain(q: torch.Tensor, kw: torch.Tensor, rpb: torch.Tensor, pb: torch.Tensor, value: torch.Tensor,
                    kernel_size: int) -> torch.Tensor:
    """``kernel_av`` in standard operators, for export: the soft-maxed kernel formed, the clamped windows gathered
    one window row at a time (index_select; transient memory N*c*H*W*K) and summed. Index tensors come from the
    map size at run time, so graphs export with dynamic image size."""
    n, c, h, w = value.shape
    k = kernel_size
    rows, cols = _plain_windows(h, k, value.device), _plain_windows(w, k, value.device)  # (K, H), (K, W)
    ar_h, ar_w = torch.arange(h, device=value.device), torch.arange(w, device=value.device)
    flat = ((rows - ar_h + k - 1).t()[:, None, :, None] * (2 * k - 1)
            + (cols - ar_w + k - 1).t()[None, :, None, :])  # (H, W, K, K) table index (``rpb_bias``)
    heads = rpb.shape[0]
    bias = rpb.reshape(heads, -1).index_select(1, flat.reshape(-1)).reshape(heads, h * w, k * k) + pb
    kernel = (torch.matmul(q, kw).to(bias.dtype) + bias).softmax(dim=-1).to(value.dtype)  # (B, G, HW, K*K)
    kernel = kernel.reshape(n, h, w, k, k)
    out = None
    for a in range(k):
        win = value.index_select(2, rows[a]).index_select(3, cols.reshape(-1)).reshape(n, c, h, k, w)
        part = (win * kernel[:, None, :, :, a, :].permute(0, 1, 2, 4, 3)).sum(3)  # (N, c, H, W)
        out = part if out is None else out + part
    return out


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


def _groups(h: int, w: int, ks: int):
    """(rows, cols, window rows, window cols) of each group of pixels sharing one clamped window."""
    for sr, i0, i1 in _runs(h, ks):
        for sc, j0, j1 in _runs(w, ks):
            yield slice(i0, i1), slice(j0, j1), slice(sr, sr + ks), slice(sc, sc + ks)


@_cached
def _group_order(h: int, w: int, ks: int, device):
    """The pixels listed group by group (row-major inside a group): (order (HW,) pixel indices, its inverse,
    [(first, end, rows, cols, window rows, window cols)] of each group's run in that order); order and inverse
    are None for a single group (the pixel order itself)."""
    idx = torch.arange(h * w, device=device).view(h, w)
    parts, runs, first = [], [], 0
    for rows, cols, wr, wc in _groups(h, w, ks):
        parts.append(idx[rows, cols].reshape(-1))
        runs.append((first, first + parts[-1].numel(), rows, cols, wr, wc))
        first += parts[-1].numel()
    order = torch.cat(parts)
    return (None, None, runs) if len(runs) == 1 else (order, torch.argsort(order), runs)  # None: pixel order


def _grouped_forward(weights: torch.Tensor, value: torch.Tensor, ks: int) -> torch.Tensor:
    """Maps barely wider than K (stage 3 and 4 at 224x224) have few distinct windows: (H-K+1) x (W-K+1), 1 to 16.
    With the weights (N, H*W, K*K) listed group by group (``_group_order``: ``kernel_av`` computes them in that
    order; ``na2d_av`` reorders its attn, one copy unless the map has a single window), each group of pixels sharing
    a window is one matmul of that window's values (N, c, K*K) with a contiguous run of weights: nothing is
    scattered, no window copied more than once."""
    n, c, h, w = value.shape
    out = value.new_empty(n, c, h, w)
    for first, end, rows, cols, wr, wc in _group_order(h, w, ks, value.device)[2]:
        window = value[:, :, wr, wc].reshape(n, c, ks * ks)
        out[:, :, rows, cols] = torch.matmul(window, weights[:, first:end].mT).view(
            n, c, rows.stop - rows.start, cols.stop - cols.start)
    return out


def _grouped_backward(weights: torch.Tensor, value: torch.Tensor, grad_out: torch.Tensor, ks: int,
                      need: Tuple[bool, bool]):
    """(gradient of the group-ordered weights (N, H*W, K*K), gradient of value), the ones ``need`` asks for."""
    n, c, h, w = value.shape
    grad_w = value.new_empty(n, h * w, ks * ks) if need[0] else None
    grad_v = torch.zeros_like(value) if need[1] else None
    for first, end, rows, cols, wr, wc in _group_order(h, w, ks, value.device)[2]:
        g = grad_out[:, :, rows, cols].reshape(n, c, -1)  # (N, c, P)
        if need[0]:
            grad_w[:, first:end] = torch.matmul(g.mT, value[:, :, wr, wc].reshape(n, c, ks * ks))
        if need[1]:
            grad_v[:, :, wr, wc] += torch.matmul(g, weights[:, first:end]).view(n, c, ks, ks)
    return grad_w, grad_v


def _pick(t: torch.Tensor, dim: int, index) -> torch.Tensor:
    """t reordered along ``dim`` by ``index`` (``_group_order``'s order or inverse); t itself if that is None."""
    return t if index is None else t.index_select(dim, index)


def _to_groups(attn: torch.Tensor) -> torch.Tensor:
    """(N, K*K, H, W) attn -> (N, H*W, K*K) weights in the grouped path's pixel order."""
    n, kk, h, w = attn.shape
    order = _group_order(h, w, int(kk ** 0.5), attn.device)[0]
    return _pick(attn.permute(0, 2, 3, 1).reshape(n, h * w, kk), 1, order)


def _from_groups(weights: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``_to_groups``: (N, H*W, K*K) group-ordered -> (N, K*K, H, W) (a view of pixel order)."""
    n, _, kk = weights.shape
    inverse = _group_order(h, w, int(kk ** 0.5), weights.device)[1]
    return _pick(weights, 1, inverse).view(n, h, w, kk).permute(0, 3, 1, 2)


def _grouped(h: int, w: int, ks: int) -> bool:
    return (h - ks + 1) * (w - ks + 1) <= MAX_GROUPS


def av_forward(attn: torch.Tensor, value: torch.Tensor, ks: int) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(output, saved) of the aggregation: fused Triton kernels on GPUs, else the grouped path on maps with few
    distinct windows and tiles otherwise."""
    if triton_av.available(value):
        return triton_av.av_forward(attn, value, ks)
    if _grouped(*value.shape[-2:], ks):
        return _grouped_forward(_to_groups(attn), value, ks), (attn, value)
    return _tiled_forward(attn, value.contiguous(), ks)


def av_kept_values(value: torch.Tensor, ks: int) -> torch.Tensor:
    """The values in the form ``av_forward`` keeps them (second of its saved pair), for a backward without it."""
    if triton_av.available(value) or _grouped(*value.shape[-2:], ks):
        return value
    return _channels_last_values(value)


def av_backward(saved: Tuple[torch.Tensor, ...], grad_out: torch.Tensor, ks: int, need: Tuple[bool, bool]):
    """(grad_attn in attn's layout, grad_value) from ``av_forward``'s saved tensors."""
    if triton_av.available(saved[1]):
        return triton_av.av_backward(saved, grad_out, ks, need)
    if _grouped(*grad_out.shape[-2:], ks):
        attn, value = saved
        grad_w, grad_v = _grouped_backward(_to_groups(attn), value, grad_out, ks, need)
        return None if grad_w is None else _from_groups(grad_w, *value.shape[-2:]), grad_v
    return _tiled_backward(saved, grad_out, ks, need)


class _AV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn: torch.Tensor, value: torch.Tensor, ks: int) -> torch.Tensor:
        out, saved = av_forward(attn, value, ks)
        ctx.save_for_backward(*saved)
        ctx.ks = ks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, None]:
        return *av_backward(ctx.saved_tensors, grad_out, ctx.ks, ctx.needs_input_grad[:2]), None


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Memory-lean neighbourhood aggregation (see module docstring for layouts)."""
    _check(attn, value, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f'na2d_av needs an odd kernel size, got {kernel_size}')
    attn = attn.to(value.dtype)
    return _AV.apply(attn, value, kernel_size)


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
