"""Fused Triton kernels for the neighbourhood aggregation (``na2d_av`` semantics, see ``neighborhood.py``) on GPUs.

The PyTorch formulation loops over the K window rows, each a handful of launches; on a GPU the aggregation is a
pure gather-and-sum, so one kernel per pass does it straight from the inputs, with no transient tensor at all:

- forward: a program takes a block of pixels, loads their (P, K*K) window weights as one tile (rows contiguous in
  ContMix's (N, H, W, K*K) layout) and, per channel, gathers the K*K window values and reduces;
- grad_attn: the same tile of window values per channel, multiplied by grad_out and accumulated over channels,
  stored as a (P, K*K) tile in ContMix's layout;
- grad_value: deterministic (no atomics): a program takes a block of value pixels of one row and walks the query
  pixels whose clamped windows hold them. Those form a contiguous range per axis, K long in the interior, at most
  K + K // 2 near a border of a map wider than 2K - 1 (the whole map on narrower ones).

Accumulation is fp32 whatever the input dtype. ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the test
suite does this, so CI checks the kernels without a GPU). ``KERNELS.triton_av`` (``ops.config``; ``OVERLOCK_TRITON=0``)
turns the kernels off.
"""
import os

import torch

from .config import KERNELS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch formulation is used
    triton = None

__all__ = ['available', 'av_forward', 'av_backward']


def available(t: torch.Tensor) -> bool:
    """Whether the kernels serve this tensor: CUDA (or the interpreter), Triton installed, not switched off, and
    not while torch.compile traces (the standalone na2d_av is traced in its PyTorch formulation; ContMix's
    kernel_av reaches the kernels through its custom operator, which runs outside the trace)."""
    if triton is None or not KERNELS.triton_av or torch.compiler.is_compiling():
        return False
    return t.is_cuda or os.environ.get('TRITON_INTERPRET') == '1'


if triton is not None:
    @triton.jit
    def _start(pos, length, K: tl.constexpr):
        """First index of the clamped window of ``pos`` (NATTEN's rule)."""
        return tl.minimum(tl.maximum(pos - K // 2, 0), length - K)

    @triton.jit
    def _window_offsets(n, pix, H, W, sv_n, sv_h, sv_w, K: tl.constexpr, KKP: tl.constexpr):
        """(P, KKP) value offsets (channel 0) of each pixel's window slots, and the mask of valid pixel-slot pairs."""
        i, j = pix // W, pix % W
        slot = tl.arange(0, KKP)
        a, b = slot // K, slot % K
        rows = _start(i, H, K)[:, None] + a[None, :]
        cols = _start(j, W, K)[:, None] + b[None, :]
        mask = (pix < H * W)[:, None] & (slot < K * K)[None, :]
        return n * sv_n + rows * sv_h + cols * sv_w, mask

    @triton.jit
    def _fwd_kernel(attn, value, out, C, H, W, sa_n, sa_k, sa_h, sa_w, sv_n, sv_c, sv_h, sv_w,
                    K: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        v_off, mask = _window_offsets(n, pix, H, W, sv_n, sv_h, sv_w, K, KKP)
        i, j = pix // W, pix % W
        slot = tl.arange(0, KKP)
        a_off = n * sa_n + (i * sa_h + j * sa_w)[:, None] + slot[None, :] * sa_k
        weights = tl.load(attn + a_off, mask=mask, other=0.0).to(tl.float32)
        out_off = n * C * H * W + pix
        for c in range(C):
            vals = tl.load(value + v_off + c * sv_c, mask=mask, other=0.0).to(tl.float32)
            tl.store(out + out_off + c * H * W, tl.sum(weights * vals, axis=1).to(out.dtype.element_ty),
                     mask=pix < H * W)

    @triton.jit
    def _grad_attn_kernel(grad, value, grad_attn, C, H, W, sg_n, sg_c, sv_n, sv_c, sv_h, sv_w,
                          K: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        v_off, mask = _window_offsets(n, pix, H, W, sv_n, sv_h, sv_w, K, KKP)
        acc = tl.zeros((BLOCK_P, KKP), dtype=tl.float32)
        g_off = n * sg_n + pix  # grad_out is contiguous: pixel offset i * W + j
        for c in range(C):
            g = tl.load(grad + g_off + c * sg_c, mask=pix < H * W, other=0.0).to(tl.float32)
            vals = tl.load(value + v_off + c * sv_c, mask=mask, other=0.0).to(tl.float32)
            acc += g[:, None] * vals
        slot = tl.arange(0, KKP)
        out_off = (n * H * W + pix)[:, None] * (K * K) + slot[None, :]  # (N, H, W, K*K): ContMix's layout
        tl.store(grad_attn + out_off, acc.to(grad_attn.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_value_kernel(grad, attn, grad_value, C, H, W, sa_n, sa_k, sa_h, sa_w,
                           K: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        y = tl.program_id(1)
        x = tl.program_id(2) * BLOCK_X + tl.arange(0, BLOCK_X)
        ch = tl.arange(0, BLOCK_C)
        r: tl.constexpr = K // 2
        # query rows whose window holds row y: a contiguous range (see module docstring)
        i_lo = tl.where(y - K + 1 <= 0, 0, y - r)
        i_hi = tl.where(y >= H - K, H - 1, y + r)
        # the same along the columns, per lane
        j_lo = tl.where(x - K + 1 <= 0, 0, x - r)
        j_hi = tl.where(x >= W - K, W - 1, x + r)
        x_ok = x < W
        span = tl.max(tl.where(x_ok, j_hi - j_lo + 1, 0), axis=0)  # K in the interior, up to 2K - 1 on narrow maps
        for c0 in range(0, C, BLOCK_C):
            c_ok = (c0 + ch) < C
            acc = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
            for i in range(i_lo, i_hi + 1):
                a = y - _start(i, H, K)
                for d in range(span):
                    j = j_lo + d
                    ok = x_ok & (j <= j_hi)
                    b = x - _start(j, W, K)
                    w = tl.load(attn + n * sa_n + (a * K + b) * sa_k + i * sa_h + j * sa_w, mask=ok,
                                other=0.0).to(tl.float32)
                    g_off = n * C * H * W + (c0 + ch)[None, :] * (H * W) + (i * W + j)[:, None]
                    g = tl.load(grad + g_off, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                    acc += w[:, None] * g
            v_off = n * C * H * W + (c0 + ch)[None, :] * (H * W) + (y * W + x)[:, None]
            tl.store(grad_value + v_off, acc.to(grad_value.dtype.element_ty), mask=x_ok[:, None] & c_ok[None, :])


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


BLOCK_P = 32  # pixels per program (forward, grad_attn): a (32, K*K padded) fp32 tile stays in registers
BLOCK_X = 32  # value pixels per program (grad_value)


def av_forward(attn: torch.Tensor, value: torch.Tensor, ks: int):
    """(output, saved) like ``neighborhood.av_forward``: attn (N, K*K, H, W) any strides, value (N, c, H, W)."""
    n, c, h, w = value.shape
    out = torch.empty((n, c, h, w), dtype=value.dtype, device=value.device)
    grid = (n, triton.cdiv(h * w, BLOCK_P))
    _fwd_kernel[grid](attn, value, out, c, h, w, *attn.stride(), *value.stride(),
                      K=ks, KKP=_pow2(ks * ks), BLOCK_P=BLOCK_P)
    return out, (attn, value)


def av_backward(saved, grad_out: torch.Tensor, ks: int, need):
    """(grad_attn as an (N, K*K, H, W) view of an (N, H, W, K*K) tensor, grad_value)."""
    attn, value = saved
    n, c, h, w = value.shape
    grad_out = grad_out.contiguous()
    grad_attn = grad_value = None
    if need[0]:
        g5 = torch.empty((n, h, w, ks * ks), dtype=attn.dtype, device=value.device)
        _grad_attn_kernel[(n, triton.cdiv(h * w, BLOCK_P))](
            grad_out, value, g5, c, h, w, grad_out.stride(0), grad_out.stride(1), *value.stride(),
            K=ks, KKP=_pow2(ks * ks), BLOCK_P=BLOCK_P)
        grad_attn = g5.permute(0, 3, 1, 2)
    if need[1]:
        grad_value = torch.empty((n, c, h, w), dtype=value.dtype, device=value.device)
        block_c = min(_pow2(c), 32)
        _grad_value_kernel[(n, h, triton.cdiv(w, BLOCK_X))](
            grad_out, attn, grad_value, c, h, w, *attn.stride(), K=ks, BLOCK_X=BLOCK_X, BLOCK_C=block_c)
    return grad_attn, grad_value
