"""Training-form sub-graphs as single autograd functions that keep one input map and recompute the rest.

Autograd saves one map per op: a DilatedReparamBlock keeps the input of each of its 7-8 branch BatchNorms, and the
MLP chain (1x1 conv, GELU, x + DW3x3, GRN, 1x1 conv) four hidden-width maps. Those made OverLoCK-T's training
memory several times ConvNeXt-T's. Here the backward recomputes them from what is kept:

* ``bn_branch_sum``: sum_i BN_i(dwconv_i(x)) in training mode keeps x and the batch statistics (and on maps up to
  16x16 the first branch's output, ``KEEP_FIRST``); the backward re-runs each other branch convolution (a forward
  depth-wise conv) before that branch's BatchNorm and conv backward (on large CPU maps all branches' conv gradients
  together in frequency space, ``SpectralGrads``; on CUDA, where ``triton_dwconv.use_branches`` says so, every
  branch in one Triton launch per pass). A LayerNorm in front (``norm``) runs inside, its output recomputed instead
  of kept.
* ``bn_act``: act(BN(x)) keeps x, not also the BatchNorm output.
* ``gated_bn_conv``: conv1x1(BN(y * s * gate)) (the Focus-Net block's output projection) keeps y, s and gate.
* ``dw_bn_act_conv``: conv1x1(GELU(BN(DW3x3(x)))) (the Focus-Net fusion chain) keeps x, not also the BatchNorm
  input and the GELU output.
* ``conv_mlp``: keeps the chain's input (before the block's squeeze-excitation scale) and one hidden map, the GELU
  input (ConvNeXt's MLP keeps two), or none (``keep_hidden=False``: the first 1x1 conv runs again); the GELU output
  and the 3x3 depth-wise conv are recomputed, and the GRN output is never formed again (the last 1x1 conv's weight
  gradient comes from the GRN input and its per-image scale).

All are exact (float64 gradcheck in the tests) and update the BatchNorm running statistics once, as the modules
do. They run with autocast off, in the autocast dtype when it is on (BatchNorm statistics and GRN norms in fp32).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import triton_dwconv
from .dwconv import SMALL_MAP, SpectralGrads, _conv, _layout, autocast_args, dw_conv2d_backward
from .grn import _channels_last, grn_backward, grn_forward, grn_scale

__all__ = ['bn_act', 'bn_branch_sum', 'bn_momentum', 'conv_mlp', 'dw_bn_act_conv', 'gated_bn_conv',
           'image_groups']


def _ln2d(x, weight, bias, eps):
    """timm's LayerNorm2d through the kernel it calls (permute, native_layer_norm, permute back), with the
    statistics its backward needs."""
    y, mean, rstd = torch.ops.aten.native_layer_norm(x.permute(0, 2, 3, 1), [x.shape[1]], weight, bias, eps)
    return y.permute(0, 3, 1, 2), mean, rstd


def _scratch(buffers: dict, like: torch.Tensor) -> torch.Tensor:
    """A buffer shaped and laid out like ``like``, one per layout, reused within one call (no fresh map, and
    none of its page faults, per branch)."""
    key = like.is_contiguous()
    if key not in buffers:
        buffers[key] = torch.empty_like(like)
    return buffers[key]


# On maps up to 16x16 (stage 3 at 224) the first branch's output, the K x K conv's, is kept rather than recomputed:
# it is the larger part of the recomputation's cost there, and small to keep
KEEP_FIRST = SMALL_MAP


class _BranchSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dilations, bn_args, ln_eps, dtype, *params):
        n = len(dilations)
        weights, gammas, betas, ln = params[:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:]
        u, ln_stats = x, ()
        if ln_eps is not None:  # the LayerNorm before the block, in x's dtype; its output is not kept
            u, *ln_stats = _ln2d(x, *ln, ln_eps)
            u = u.to(dtype)
        # sum_i gamma_i (z_i - mean_i) invstd_i + beta_i = sum_i s_i z_i + sum_i (beta_i - s_i mean_i), s_i = gamma_i
        # invstd_i: each branch output is read for its statistics and once more for a multiply-add into the sum (in
        # at least fp32), with no normalised copy written and read again (fewer passes through memory)
        out, shift, stats, layouts, kept = None, 0, [], {}, None
        # CUDA: every branch in one Triton launch where measured faster (``triton_dwconv.use_branches``)
        fused = triton_dwconv.use_branches(u, [w.shape[-1] for w in weights], dilations)
        zs = triton_dwconv.branches_forward(u, weights, dilations) if fused else None
        for i, (w, d, (rm, rv, momentum, eps), gamma, beta) in enumerate(zip(weights, dilations, bn_args, gammas,
                                                                             betas)):
            z = zs[i] if fused else _conv(_layout(u, w.shape[-1], d, layouts), w, None, d)
            mean, var = torch.batch_norm_update_stats(z, rm, rv, momentum)  # running statistics as BatchNorm2d's
            invstd = 1 / (var + eps).sqrt()
            s = gamma * invstd
            shift = shift + beta - mean * s
            if out is None:
                out = torch.mul(z, s.view(1, -1, 1, 1))
                kept = z if z.shape[-2] * z.shape[-1] <= KEEP_FIRST and not fused else None
            else:
                out.addcmul_(z, s.view(1, -1, 1, 1))
            stats += [mean, invstd]
        out = out.add_(shift.view(1, -1, 1, 1)).to(dtype)
        ctx.save_for_backward(x, *weights, *gammas, *stats, *ln, *ln_stats, kept)
        ctx.dilations, ctx.eps, ctx.ln_eps, ctx.dtype = dilations, [a[3] for a in bn_args], ln_eps, dtype
        ctx.fused = fused
        return out

    @staticmethod
    def _branch_grads(ctx, g, u, kept, weights, gammas, stats, need_w, need_x):
        """(input gradient, kernel, gamma and beta gradients) branch by branch: each output recomputed (or the kept
        first one), its BatchNorm backward, then its convolution's gradients (on large CPU maps in frequency space
        for all branches together, ``SpectralGrads``)."""
        grad_x, grads_w, grads_g, grads_b, layouts, scratch = None, [], [], [], {}, {}
        sizes = [w.shape[-1] for w in weights]
        spectral = SpectralGrads(u, sizes, ctx.dilations) if SpectralGrads.use(u, sizes) else None
        for i, (w, d, gamma, eps) in enumerate(zip(weights, ctx.dilations, gammas, ctx.eps)):
            # the kept first output, or recomputed
            z = kept if i == 0 and kept is not None else _conv(_layout(u, w.shape[-1], d, layouts), w, None, d)
            freq = spectral is not None and spectral.takes(w.shape[-1])
            # gz: a buffer reused by every branch; the spectral path's own transform buffer when the dtypes agree
            into = spectral.interior() if freq and spectral.buf.dtype == z.dtype else None
            gz, gg, gb = torch.ops.aten.native_batch_norm_backward.out(
                g, z, gamma, None, None, stats[2 * i], stats[2 * i + 1], True, eps, [True, True, True],
                out0=_scratch(scratch, z) if into is None else into, out1=torch.empty_like(gamma),
                out2=torch.empty_like(gamma))
            del z
            kept = None
            if freq:  # large maps: the branches' gradients in frequency space
                gw = spectral.add(w, d, gz, (need_x, need_w[i]))
            else:
                gx, gw = dw_conv2d_backward(u, w, gz, d, (need_x, need_w[i]), layouts)
                grad_x = gx if grad_x is None or gx is None else grad_x.add_(gx)
            grads_w.append(gw)
            grads_g.append(gg)
            grads_b.append(gb)
        if spectral is not None:
            gx = spectral.input_grad()  # plus the input gradients of branches it did not take
            if gx is not None:
                grad_x = gx if grad_x is None else gx.add_(grad_x)
        return grad_x, grads_w, grads_g, grads_b

    @staticmethod
    def _fused_grads(ctx, g, u, weights, gammas, stats, need_w, need_x):
        """(input gradient, kernel, gamma and beta gradients) with the branches' convolutions in one Triton launch
        per pass: the outputs recomputed together, the BatchNorm backwards written into one stack of output
        gradients, then the summed input gradient and every kernel gradient from that stack."""
        zs = triton_dwconv.branches_forward(u, weights, ctx.dilations)
        gzs = torch.empty_like(zs)
        grads_g, grads_b = [], []
        for i, (gamma, eps) in enumerate(zip(gammas, ctx.eps)):
            _, gg, gb = torch.ops.aten.native_batch_norm_backward.out(
                g, zs[i], gamma, None, None, stats[2 * i], stats[2 * i + 1], True, eps, [True, True, True],
                out0=gzs[i], out1=torch.empty_like(gamma), out2=torch.empty_like(gamma))
            grads_g.append(gg)
            grads_b.append(gb)
        del zs
        grad_x = triton_dwconv.branches_input_grad(gzs, weights, ctx.dilations) if need_x else None
        grads_w = [None] * len(weights)
        if any(need_w):
            grads_w = [gw if need else None for gw, need in
                       zip(triton_dwconv.branches_weight_grad(u, gzs, weights, ctx.dilations), need_w)]
        return grad_x, grads_w, grads_g, grads_b

    @staticmethod
    def backward(ctx, g):
        n = len(ctx.dilations)
        x, *saved, kept = ctx.saved_tensors  # read once (checkpointing allows one unpack)
        weights, gammas, stats, ln = saved[:n], saved[n:2 * n], saved[2 * n:4 * n], saved[4 * n:]
        need = ctx.needs_input_grad
        has_ln = ctx.ln_eps is not None
        need_x = need[0] or (has_ln and (need[5 + 3 * n] or need[6 + 3 * n]))  # the LayerNorm's grads need it too
        u = x if not has_ln else _ln2d(x, ln[0], ln[1], ctx.ln_eps)[0].to(ctx.dtype)  # recomputed
        if ctx.fused:
            grads = _BranchSum._fused_grads(ctx, g, u, weights, gammas, stats, need[5:5 + n], need_x)
        else:
            grads = _BranchSum._branch_grads(ctx, g, u, kept, weights, gammas, stats, need[5:5 + n], need_x)
        grad_x, grads_w, grads_g, grads_b = grads
        grads_ln = []
        if has_ln:
            del u
            lw, lb, mean, rstd = ln
            gx, glw, glb = torch.ops.aten.native_layer_norm_backward(
                grad_x.to(x.dtype).permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), [x.shape[1]], mean, rstd, lw, lb,
                [need[0], need[5 + 3 * n], need[6 + 3 * n]])
            grad_x = gx.permute(0, 3, 1, 2) if gx is not None else None
            grads_ln = [glw, glb]
        return grad_x, None, None, None, None, *grads_w, *grads_g, *grads_b, *grads_ln


def bn_momentum(bn: torch.nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward does before normalising in training: count the batch, pick the momentum."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def bn_branch_sum(x: torch.Tensor, weights: Sequence[torch.Tensor], dilations: Sequence[int],
                  bns: Sequence[torch.nn.BatchNorm2d], norm: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """sum_i bns[i](depth-wise 'same' conv(u, weights[i], dilations[i])), u = norm(x) (a timm LayerNorm2d) or x,
    every BatchNorm in training mode (batch statistics; running statistics updated as nn.BatchNorm2d does). With
    ``norm`` only x is kept, not also the LayerNorm's output; the LayerNorm runs in x's dtype (fp32 under autocast,
    as autocast runs layer_norm) through the kernels the module calls, so results equal the modules' exactly."""
    bn_args = [(bn.running_mean, bn.running_var, bn_momentum(bn), bn.eps) for bn in bns]
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if norm is None:
        x, *weights = autocast_args(dev, x, *weights)
    else:
        weights = autocast_args(dev, *weights)
    ln = () if norm is None else (norm.weight, norm.bias)
    with torch.autocast(dev, enabled=False):
        return _BranchSum.apply(x, tuple(dilations), tuple(bn_args), None if norm is None else norm.eps, dtype,
                                *weights, *[bn.weight for bn in bns], *[bn.bias for bn in bns], *ln)


def _bn_output(x, gamma, beta, mean, invstd):
    """A training-mode BatchNorm's output recomputed from its input and the saved batch statistics."""
    scale = gamma * invstd
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul((beta - mean * scale).view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


_ACTS = {'gelu': (F.gelu, lambda g, y: torch.ops.aten.gelu_backward(g, y)),
         'silu': (F.silu, lambda g, y: torch.ops.aten.silu_backward(g, y))}


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, momentum, eps, act):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, gamma, beta, running_mean, running_var, True,
                                                           momentum, eps)
        ctx.save_for_backward(x, gamma, beta, mean, invstd)
        ctx.eps, ctx.act = eps, act
        return _ACTS[act][0](y)

    @staticmethod
    def backward(ctx, g):
        x, gamma, beta, mean, invstd = ctx.saved_tensors
        y = _bn_output(x, gamma, beta, mean, invstd)
        gy = _ACTS[ctx.act][1](g, y)
        del y
        need = ctx.needs_input_grad
        gx, gg, gb = torch.ops.aten.native_batch_norm_backward(gy, x, gamma, None, None, mean, invstd, True, ctx.eps,
                                                               [need[0], need[1], need[2]])
        return gx, gg, gb, None, None, None, None, None


def bn_act(x: torch.Tensor, bn: torch.nn.BatchNorm2d, act: str) -> torch.Tensor:
    """act(bn(x)) with ``bn`` in training mode, keeping x alone (not also the BatchNorm output); act: gelu, silu."""
    dev = x.device.type
    (x,) = autocast_args(dev, x)
    with torch.autocast(dev, enabled=False):
        return _BNAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn_momentum(bn), bn.eps, act)


class _GatedBNConv(torch.autograd.Function):
    @staticmethod
    def _bn_input(y, s, gate):
        return y * s * gate

    @staticmethod
    def forward(ctx, y, s, gate, gamma, beta, running_mean, running_var, momentum, eps, w, b):
        t, mean, invstd = torch.ops.aten.native_batch_norm(_GatedBNConv._bn_input(y, s, gate), gamma, beta,
                                                           running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(y, s, gate, gamma, beta, mean, invstd, w)
        ctx.eps = eps
        return F.conv2d(t, w, b)

    @staticmethod
    def backward(ctx, g):
        y, s, gate, gamma, beta, mean, invstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        m = _GatedBNConv._bn_input(y, s, gate)  # recomputed, and the BatchNorm output from it
        t = _bn_output(m, gamma, beta, mean, invstd)
        _, gw, gb = _conv1x1_backward(g, t, w, (False, need[9], need[10]))
        del t
        gm, gg, gbeta = torch.ops.aten.native_batch_norm_backward(
            F.conv2d(g, w.transpose(0, 1)), m, gamma, None, None, mean, invstd, True, ctx.eps, [True, need[3], need[4]])
        del m
        gy = gm * (s * gate) if need[0] else None
        gs = (gm * gate * y).sum((2, 3), keepdim=True) if need[1] else None
        ggate = gm.mul_(y * s) if need[2] else None
        return gy, gs, ggate, gg, gbeta, None, None, None, None, gw, gb


def gated_bn_conv(y: torch.Tensor, s: torch.Tensor, gate: torch.Tensor, bn: torch.nn.BatchNorm2d,
                  conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv1x1(bn(y * s * gate)), ``bn`` in training mode, s (N, C, 1, 1): keeps y, s and gate, not also the
    product, the BatchNorm input and its output."""
    dev = y.device.type
    y, s, gate, w, b = autocast_args(dev, y, s, gate, conv.weight, conv.bias)
    with torch.autocast(dev, enabled=False):
        return _GatedBNConv.apply(y, s, gate, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn_momentum(bn),
                                  bn.eps, w, b)


class _DWBNActConv(torch.autograd.Function):
    """conv1x1(act(BN(DW3x3(x)))) keeping x and the batch statistics. The backward recomputes the BatchNorm input and
    the activation with the very kernels of the forward (the batch statistics too, without touching the running
    ones), and calls the backward kernels autograd would: the gradients equal the plain modules' bit for bit."""

    @staticmethod
    def _recompute(x, wdw, bdw, gamma, beta, eps, act):
        z = _conv(x, wdw, bdw, 1)
        y = torch.ops.aten.native_batch_norm(z, gamma, beta, None, None, True, 0.0, eps)[0]
        return z, y, _ACTS[act][0](y)

    @staticmethod
    def forward(ctx, x, wdw, bdw, gamma, beta, running_mean, running_var, momentum, eps, act, w, b):
        y, mean, invstd = torch.ops.aten.native_batch_norm(_conv(x, wdw, bdw, 1), gamma, beta, running_mean,
                                                           running_var, True, momentum, eps)
        ctx.save_for_backward(x, wdw, bdw, gamma, beta, mean, invstd, w)
        ctx.eps, ctx.act = eps, act
        return F.conv2d(_ACTS[act][0](y), w, b)

    @staticmethod
    def backward(ctx, g):
        x, wdw, bdw, gamma, beta, mean, invstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        z, y, u = _DWBNActConv._recompute(x, wdw, bdw, gamma, beta, ctx.eps, ctx.act)
        gu, gw, gb = _conv1x1_backward(g, u, w, (True, need[10], need[11]))
        del u
        gy = _ACTS[ctx.act][1](gu, y)
        del gu, y
        gz, gg, gbeta = torch.ops.aten.native_batch_norm_backward(gy, z, gamma, None, None, mean, invstd, True,
                                                                  ctx.eps, [True, need[3], need[4]])
        del gy, z
        gx, gwdw = dw_conv2d_backward(x, wdw, gz, 1, (need[0], need[1]))
        gbdw = gz.sum((0, 2, 3)) if need[2] and bdw is not None else None
        return gx, gwdw, gbdw, gg, gbeta, None, None, None, None, None, gw, gb


def dw_bn_act_conv(x: torch.Tensor, dw: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, act: str,
                   conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv(act(bn(dw(x)))) for a depth-wise 3x3 ``dw``, ``bn`` in training mode and a 1x1 ``conv`` (the Focus-Net
    fusion chain), keeping x alone instead of also the BatchNorm input and the activation output."""
    dev = x.device.type
    x, wdw, bdw, w, b = autocast_args(dev, x, dw.weight, dw.bias, conv.weight, conv.bias)
    with torch.autocast(dev, enabled=False):
        return _DWBNActConv.apply(x, wdw, bdw, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn_momentum(bn),
                                  bn.eps, act, w, b)


def _conv1x1_backward(g, x, w, mask) -> Tuple[Optional[torch.Tensor], ...]:
    return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               list(mask))


def _grn_conv1x1_params_grad(g, h, scale, beta) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight grad, bias grad) of conv1x1(h * scale + beta), scale (N, C, 1, 1) per image, beta (1, C, 1, 1),
    without forming the GRN output: sum_n scale_n * (g_n^T h_n) + (sum g) beta^T, one batched matmul (a full-size
    map fewer, and no fresh hidden-width allocation and its page faults)."""
    n, o, i, hw = g.shape[0], g.shape[1], h.shape[1], g.shape[2] * g.shape[3]
    gsum = g.sum((0, 2, 3))
    if hw * 4 <= o:  # small maps (stage 4): the scaled map is smaller than the N per-image products; one matmul
        gw = torch.mm(g.permute(0, 2, 3, 1).reshape(-1, o).t(), (h * scale).permute(0, 2, 3, 1).reshape(-1, i))
        return gw.addr_(gsum, beta.view(i).to(g.dtype)).view(o, i, 1, 1), gsum
    cl = torch.channels_last
    if g.is_contiguous(memory_format=cl) and h.is_contiguous(memory_format=cl):
        per = torch.bmm(g.permute(0, 2, 3, 1).reshape(n, -1, o).mT, h.permute(0, 2, 3, 1).reshape(n, -1, i))
    else:
        per = torch.bmm(g.reshape(n, o, -1), h.reshape(n, i, -1).mT)  # (N, O, I)
    gw = per.mul_(scale.view(n, 1, i)).sum(0).addr_(gsum, beta.view(i).to(g.dtype))  # (einsum copies: slow)
    return gw.view(o, i, 1, 1), gsum


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _nhwc(fn, *maps: torch.Tensor) -> torch.Tensor:
    """fn of channels-last maps through their contiguous NHWC views: PyTorch's CPU GELU and its backward are
    faster there than on the 4-d channels-last tensors (in fp32 they round differently, by ~1 ulp)."""
    if not all(_channels_last(m) for m in maps):
        return fn(*maps)
    return fn(*(m.permute(0, 2, 3, 1) for m in maps)).permute(0, 3, 1, 2)


CHAIN_BYTES = 8 << 20  # CPU: images go through the MLP chain in groups whose hidden map is at most this large


def image_groups(x: torch.Tensor, hidden: int) -> List[slice]:
    """Slices of the batch that the MLP chain runs one after another on the CPU (``conv_mlp`` in training, the
    plain modules without autograd). Its hidden maps are bandwidth-bound there and a training step passes through
    them many times; in groups of <= ``CHAIN_BYTES`` they stay in cache (see docs/performance.md). Everything but
    the parameter gradients is per image (GRN normalises each image), so the result is the same up to the order in
    which the parameter gradients are summed. One group elsewhere, and when one image alone is larger."""
    n = x.shape[0]
    per = hidden * x.shape[-2] * x.shape[-1] * x.element_size()
    groups = -(-n * per // CHAIN_BYTES)
    if x.device.type != 'cpu' or groups <= 1 or per > CHAIN_BYTES:
        return [slice(0, n)]
    k = -(-n // groups)
    return [slice(i, min(i + k, n)) for i in range(0, n, k)]


def _sum_grads(parts: List[Tuple[Optional[torch.Tensor], ...]]) -> List[Optional[torch.Tensor]]:
    out = list(parts[0])
    for p in parts[1:]:
        out = [a if b is None else a.add_(b) for a, b in zip(out, p)]
    return out


class _ConvMLP(torch.autograd.Function):
    @staticmethod
    def _hidden(h1, wdw, bdw, residual):
        """GRN input from the GELU input: u = GELU(h1), DW3x3(u) [+ u]; returns (u, h3)."""
        u = _nhwc(F.gelu, h1)
        h3 = _conv(u, wdw, bdw, 1)
        return u, (h3.add_(u) if residual else h3)  # residual: the identity not folded into the kernel (autocast)

    @staticmethod
    def _forward(x, scale, w1, b1, wdw, bdw, gamma, beta, w2, b2, residual, eps):
        h1 = F.conv2d(x if scale is None else x * scale, w1, b1)
        u, h3 = _ConvMLP._hidden(h1, wdw, bdw, residual)
        del u
        h4, gx, mean = grn_forward(h3, gamma, beta, eps, inplace=True)  # h3 is not needed again
        return F.conv2d(h4, w2, b2), h1, gx, mean

    @staticmethod
    def forward(ctx, x, scale, w1, b1, wdw, bdw, gamma, beta, w2, b2, residual, eps, keep_hidden):
        ctx.fmt_in = _format(x)
        # on the CPU the chain runs channels-last (oneDNN is faster there, even counting the conversions of the
        # narrow input and output); the hidden maps follow x's layout
        fmt = torch.channels_last if x.device.type == 'cpu' else ctx.fmt_in
        x = x.contiguous(memory_format=fmt)
        groups = image_groups(x, w1.shape[0])
        args = (w1, b1, wdw, bdw, gamma, beta, w2, b2, residual, eps)
        if len(groups) == 1:
            out, h1, gx, mean = _ConvMLP._forward(x, scale, *args)
        else:  # written group by group while still in cache
            n, _, h, w = x.shape
            out = torch.empty(n, w2.shape[0], h, w, dtype=x.dtype, device=x.device, memory_format=ctx.fmt_in)
            h1 = torch.empty(n, w1.shape[0], h, w, dtype=x.dtype, device=x.device, memory_format=fmt) \
                if keep_hidden else None
            stats = []
            for s in groups:
                o, h1_s, gx_s, mean_s = _ConvMLP._forward(x[s], None if scale is None else scale[s], *args)
                out[s] = o
                if keep_hidden:
                    h1[s] = h1_s
                stats.append((gx_s, mean_s))
            gx, mean = (torch.cat(t) for t in zip(*stats))
        ctx.save_for_backward(x, scale, w1, b1, h1 if keep_hidden else None, wdw, bdw, gamma, beta, gx, mean, w2)
        ctx.residual, ctx.fmt, ctx.groups = residual, fmt, groups
        return out.contiguous(memory_format=ctx.fmt_in)

    @staticmethod
    def _backward(g, x, scale, w1, b1, h1, wdw, bdw, gamma, beta, gx, mean, w2, residual, need):
        # ordered so that at most three hidden-width maps are alive at once
        xs = None
        if h1 is None:  # not kept (keep_hidden=False): the first 1x1 conv again, bit for bit the forward's
            xs = x if scale is None else x * scale  # narrow: kept for the weight gradient below
            h1 = F.conv2d(xs, w1, b1)
        u, h3 = _ConvMLP._hidden(h1, wdw, bdw, residual)  # recomputed: one 3x3 depth-wise conv
        gw2, gb2 = _grn_conv1x1_params_grad(g, h3, grn_scale(gamma, gx, mean).to(h3.dtype), beta)
        g4 = F.conv2d(g, w2.transpose(0, 1))  # input gradient of the 1x1 conv
        g3, ggamma, gbeta = grn_backward(g4, h3, gamma, gx, mean, inplace=True)
        del g4, h3
        gu, gwdw = dw_conv2d_backward(u, wdw, g3, 1, (True, need[4]))
        del u
        gbdw = g3.sum((0, 2, 3)).to(wdw.dtype) if need[5] else None
        if residual:
            gu = gu.add_(g3)
        del g3
        g1 = _nhwc(lambda a, b: torch.ops.aten.gelu_backward.grad_input(a, b, grad_input=a), gu, h1)  # in place
        del gu
        if xs is None:
            xs = x if scale is None else x * scale  # recomputed
        gx_, gw1, gb1 = _conv1x1_backward(g1, xs, w1, (need[0] or need[1], need[2], need[3]))
        del xs
        gscale = None
        if scale is not None and gx_ is not None:
            gscale = (gx_ * x).sum((2, 3), keepdim=True) if need[1] else None
            gx_ = gx_.mul_(scale) if need[0] else None
        return gx_, gscale, gw1, gb1, gwdw, gbdw, ggamma, gbeta, gw2, gb2

    @staticmethod
    def backward(ctx, g):
        x, scale, w1, b1, h1, wdw, bdw, gamma, beta, gx, mean, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous(memory_format=ctx.fmt)
        parts, many = [], len(ctx.groups) > 1
        gx_ = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=ctx.fmt_in) \
            if many and need[0] else None
        for s in ctx.groups:
            part = _ConvMLP._backward(g[s], x[s], None if scale is None else scale[s], w1, b1,
                                      None if h1 is None else h1[s], wdw, bdw, gamma, beta, gx[s], mean[s], w2,
                                      ctx.residual, need)
            if gx_ is not None:
                gx_[s] = part[0]  # in the caller's layout, while in cache
            parts.append(part)
        if many:
            gscale = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
        else:
            gx_, gscale = parts[0][:2]
            gx_ = gx_.contiguous(memory_format=ctx.fmt_in) if gx_ is not None else None
        gw1, gb1, gwdw, gbdw, ggamma, gbeta, gw2, gb2 = _sum_grads([p[2:] for p in parts])
        gw2, gb2 = gw2 if need[8] else None, gb2 if need[9] else None
        return gx_, gscale, gw1, gb1, gwdw, gbdw, ggamma, gbeta, gw2, gb2, None, None, None


def conv_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], wdw: torch.Tensor,
             bdw: Optional[torch.Tensor], gamma: torch.Tensor, beta: torch.Tensor, w2: torch.Tensor,
             b2: Optional[torch.Tensor], residual: bool, eps: float = 1e-6,
             scale: Optional[torch.Tensor] = None, keep_hidden: bool = True) -> torch.Tensor:
    """conv1x1(w2) . GRN . [u +] DW3x3(wdw)(u), u = GELU(conv1x1(w1)(x [* scale])); ``residual`` adds u after the
    depth-wise conv (otherwise wdw already holds the identity in its centre tap); ``scale`` (N, C, 1, 1), the
    squeeze-excitation gate of the block, is applied inside so that x, not the scaled map, is kept.
    ``keep_hidden=False`` keeps no hidden-width map at all: the first 1x1 conv runs again in the backward."""
    dev = x.device.type
    x, scale, w1, b1, wdw, bdw, w2, b2 = autocast_args(dev, x, scale, w1, b1, wdw, bdw, w2, b2)
    with torch.autocast(dev, enabled=False):
        return _ConvMLP.apply(x, scale, w1, b1, wdw, bdw, gamma, beta, w2, b2, residual, eps, keep_hidden)
