"""Building blocks of OverLoCK, in the paper's form: each forward is written out step by step in standard PyTorch
modules and three named operators (``ops.dw_conv2d``, ``ops.grn``, ``ops.kernel_av``: the depth-wise convolution,
the global response norm and ContMix's aggregation), which pick their kernels by device inside ``ops``.

Module and parameter names follow the authors' state_dict layout so that their released checkpoints load unchanged;
indices inside the nn.Sequential containers are part of that layout. The faster training and CPU forms of these
modules (same parameters, same results) are a separate layer: ``overlock_core.accel``."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, register_notrace_function, register_notrace_module

from ..ops import dilate_and_pad, dw_conv2d, grn, kernel_av

# DilatedReparamBlock branches per large kernel: (kernel, dilation), as in UniRepLKNet.
DRB_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    19: ((5, 1), (7, 1), (9, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    17: ((5, 1), (7, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (7, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
    3: (),
}


class InferenceFold:
    """Mixin: ``reparameterize()`` (what ``timm.utils.reparameterize_model`` calls) gives the module's inference form,
    in place: its DilatedReparamBlocks merged and its BatchNorms folded into their convs (``fuse_for_inference``)."""

    def reparameterize(self) -> None:
        fuse_for_inference(self)


class FoldingSequential(InferenceFold, nn.Sequential):
    """nn.Sequential (same state_dict and forward) whose inference form folds its BatchNorms into their convs: the
    stem, the down-sampling layers, the head and the Focus blocks' fusion and gate."""


def layer_norm(dim: int) -> nn.Module:
    return LayerNorm2d(dim, eps=1e-6)


@register_notrace_module  # torch.fx: a leaf (``dw_conv2d`` picks its kernel by device and size)
class DWConv2d(nn.Conv2d):
    """Depth-wise 'same' convolution (a plain nn.Conv2d in the state_dict) through the ``dw_conv2d`` operator."""

    def __init__(self, dim: int, kernel_size: int, dilation: int = 1, bias: bool = True):
        super().__init__(dim, dim, kernel_size, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                         groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dw_conv2d(x, self.weight, self.bias, self.dilation[0])


class ResDWConv(DWConv2d):
    """x + DW3x3(x): a depth-wise conv with an identity shortcut (the plain conv's parameter names)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class LayerScale(nn.Module):
    """Per-channel affine y = w*x + b. Stored as the authors' grouped 1x1 conv (weight (C,1,1,1), bias (C))."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


@register_notrace_module  # torch.fx: a leaf (``grn`` picks its kernel by device and layout)
class GRN(nn.Module):
    """ConvNeXt-V2 global response norm. The L2 norm is computed in fp32: in fp16 the sum of squares over a large
    map overflows, which is what made the authors' AMP runs produce NaN losses."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.gamma, self.beta)


class SEModule(nn.Module):
    """Squeeze-excitation; hidden width max(16, C/8)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = max(16, dim // 8)
        self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, hidden, 1), nn.GELU(),
                                  nn.Conv2d(hidden, dim, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm2d: bn(x) = scale * x + shift per channel."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def fuse_conv_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    scale, shift = _bn_affine(bn)
    return kernel * scale.view(-1, 1, 1, 1), shift


def _set_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> None:
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(bias)


@torch.no_grad()
def fold_batchnorms(seq: nn.Sequential) -> None:
    """Fold each BatchNorm2d of ``seq`` (its running statistics: inference only) into the convolution beside it, in
    place, leaving an Identity: into a conv or a deploy-form DilatedReparamBlock before it, else into a 1x1 conv
    after it (W (s x + c) + b = (W diag(s)) x + (W c + b): exact only for an unpadded 1x1 conv)."""
    mods = list(seq)
    for i, bn in enumerate(mods):
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or not bn.affine:
            continue
        before = mods[i - 1] if i else None
        before = before.lk_origin if isinstance(before, DilatedReparamBlock) and before.deploy else before
        after = mods[i + 1] if i + 1 < len(mods) else None
        scale, shift = _bn_affine(bn)
        if isinstance(before, nn.Conv2d):
            bias = shift if before.bias is None else before.bias * scale + shift
            _set_conv(before, before.weight * scale.view(-1, 1, 1, 1), bias)
        elif isinstance(after, nn.Conv2d) and after.kernel_size == (1, 1) and after.padding == (0, 0) \
                and after.groups == 1:
            bias = after.weight.flatten(1) @ shift + (0 if after.bias is None else after.bias)
            _set_conv(after, after.weight * scale.view(1, -1, 1, 1), bias)
        else:
            continue
        seq[i] = nn.Identity()


def fuse_for_inference(module: nn.Module) -> nn.Module:
    """``module``'s inference form, in place: every DilatedReparamBlock merged into one conv, then every BatchNorm
    of its nn.Sequential containers folded into a neighbouring conv (``fold_batchnorms``). A deploy=True model
    cannot load the result (``OverLoCK.reparameterize`` keeps the BatchNorms for that)."""
    for m in list(module.modules()):
        if isinstance(m, DilatedReparamBlock):
            m.reparameterize()
    for m in list(module.modules()):
        if isinstance(m, nn.Sequential):
            fold_batchnorms(m)
    return module


class DilatedReparamBlock(nn.Module):
    """Depth-wise K x K conv plus parallel dilated small-kernel branches, each with its own BN (UniRepLKNet).
    ``reparameterize()`` folds everything into one K x K depth-wise conv with bias (the deploy form)."""

    def __init__(self, dim: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in DRB_BRANCHES:
            raise ValueError(f'DilatedReparamBlock supports kernel sizes {sorted(DRB_BRANCHES)}, got {kernel_size}')
        self.kernel_size = kernel_size
        self.branches = DRB_BRANCHES[kernel_size]
        self.lk_origin = DWConv2d(dim, kernel_size, bias=deploy)
        self.deploy = deploy
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(dim)
            for k, r in self.branches:
                self.add_module(f'dil_conv_k{k}_{r}', DWConv2d(dim, k, r, bias=False))
                self.add_module(f'dil_bn_k{k}_{r}', nn.BatchNorm2d(dim))

    def convs_and_norms(self) -> Tuple[List[nn.Conv2d], List[nn.BatchNorm2d]]:
        """The large kernel then the dilated branches, each with its BatchNorm (training form only)."""
        convs = [self.lk_origin] + [getattr(self, f'dil_conv_k{k}_{r}') for k, r in self.branches]
        bns = [self.origin_bn] + [getattr(self, f'dil_bn_k{k}_{r}') for k, r in self.branches]
        return convs, bns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        convs, bns = self.convs_and_norms()
        out = bns[0](convs[0](x))
        for conv, bn in zip(convs[1:], bns[1:]):
            out = out + bn(conv(x))
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deploy:
            return
        kernel, bias = fuse_conv_bn(self.lk_origin.weight, self.origin_bn)
        for k, r in self.branches:
            k_b, b_b = fuse_conv_bn(getattr(self, f'dil_conv_k{k}_{r}').weight, getattr(self, f'dil_bn_k{k}_{r}'))
            kernel = kernel + dilate_and_pad(k_b, r, self.kernel_size)
            bias = bias + b_b
        conv = DWConv2d(kernel.shape[0], self.kernel_size).to(kernel)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.lk_origin = conv
        del self.origin_bn
        for k, r in self.branches:
            delattr(self, f'dil_conv_k{k}_{r}')
            delattr(self, f'dil_bn_k{k}_{r}')
        self.deploy = True


class RepConvBlock(InferenceFold, nn.Module):
    """Base-Net / Overview-Net block: a residual depth-wise 3x3, then a DilatedReparamBlock, SE and a GRN MLP
    on the layer-scaled shortcut (the layer scale multiplies the shortcut, the branch is dropped)."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float = 4, ls_init_value: Optional[float] = None,
                 drop_path: float = 0., deploy: bool = False):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.dwconv = ResDWConv(dim)
        self.proj = nn.Sequential(
            layer_norm(dim), DilatedReparamBlock(dim, kernel_size, deploy), nn.BatchNorm2d(dim), SEModule(dim),
            nn.Conv2d(dim, hidden, 1), nn.GELU(), ResDWConv(hidden), GRN(hidden), nn.Conv2d(hidden, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity())
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        return self.ls(x) + self.proj(x)  # proj: LN, DRB, BN, SE, 1x1 conv, GELU, ResDWConv, GRN, 1x1 conv, DropPath


class ContextDownsample(InferenceFold, nn.Module):
    """Stride-2 conv for the Focus-Net feature and, separately, its context (``patch_embedx``)."""

    def __init__(self, in_dim: int, out_dim: int, ctx_dim: int):
        super().__init__()
        self.x_proj = nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim))
        self.h_proj = nn.Sequential(nn.Conv2d(ctx_dim, ctx_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(ctx_dim))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


def contmix_size(h: int, w: int, kernel_size: int) -> Tuple[int, int]:
    """The map size ContMix works at: the small-map rule raises the short side to K so that a K x K window fits
    (as the authors' model does); maps at least K wide keep their size."""
    if min(h, w) >= kernel_size:
        return h, w
    return (kernel_size, int(kernel_size / h * w)) if h < w else (int(kernel_size / w * h), kernel_size)


@register_notrace_function  # torch.fx: a leaf (the rule branches on the map size)
def contmix_fit(f: torch.Tensor, zn: torch.Tensor, kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """f and zn resized (bilinear) to ``contmix_size``; unchanged when they already fit a K x K window."""
    size = contmix_size(f.shape[-2], f.shape[-1], kernel_size)
    if size == tuple(f.shape[-2:]):
        return f, zn
    return (F.interpolate(f, size=size, mode='bilinear', align_corners=False),
            F.interpolate(zn, size=size, mode='bilinear', align_corners=False))


@register_notrace_function  # torch.fx: a leaf (branches on the map size)
def contmix_unfit(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """out pooled back to the map size of ``like`` (the map before ``contmix_fit``) if that resized it."""
    if out.shape[-2:] == like.shape[-2:]:
        return out
    return F.adaptive_avg_pool2d(out, like.shape[-2:])


@register_notrace_function  # torch.fx: a leaf (``kernel_av`` picks its kernel by device; dtype arithmetic)
def contmix_av(q: torch.Tensor, kw: torch.Tensor, rpb: torch.Tensor, pb: torch.Tensor, value: torch.Tensor,
               kernel_size: int) -> torch.Tensor:
    """``kernel_av`` with the bias terms in >= fp32: the bias and the softmax run there (fp16 overflows)."""
    acc = torch.promote_types(value.dtype, torch.float32)
    return kernel_av(q, kw, rpb.to(acc), pb.to(acc), value, kernel_size)


class DynamicConvBlock(InferenceFold, nn.Module):
    """Focus-Net block with ContMix.

    ContMix: the query comes from the feature part of the normalised input, the key from 7x7 adaptive-pooled region
    centres of the context part; each head's pixel-to-centre affinities (49 values) are mapped by ``weight_proj`` to a
    small (k x k) and a large (K x K) kernel, biased by relative position tables, soft-maxed and used to aggregate
    half of the fused features each over clamped neighbourhoods (``na2d_av``).

    Ablation switches: ``mixer='static'`` replaces the dynamic aggregation by a static depth-wise K x K conv (the
    query/key/affinity modules are then not built).
    """
    num_centres = 49  # 7x7 pooled region centres; the authors hard-wire 7 (their pool_size argument is ignored)

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int, smk_size: int = 5, num_heads: int = 4,
                 mlp_ratio: float = 3, ls_init_value: float = 1.0, drop_path: float = 0., is_first: bool = False,
                 is_last: bool = False, deploy: bool = False, mixer: str = 'contmix'):
        super().__init__()
        if mixer not in ('contmix', 'static'):
            raise ValueError(f"mixer must be 'contmix' or 'static', got {mixer!r}")
        if dim % (2 * num_heads):
            raise ValueError(f'dim {dim} must be divisible by 2 x heads ({2 * num_heads})')
        if smk_size > kernel_size:
            raise ValueError(f'small kernel {smk_size} is larger than the large kernel {kernel_size}')
        out_dim = dim + ctx_dim
        self.dim, self.ctx_dim, self.kernel_size, self.smk_size = dim, ctx_dim, kernel_size, smk_size
        self.num_heads, self.is_first, self.is_last, self.mixer = num_heads, is_first, is_last, mixer
        self.scale = (dim // num_heads) ** -0.5  # NOTE: the authors' C/G, although a head is C/(2G) wide

        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1.0)
            self.h_scale = LayerScale(ctx_dim, 1.0)
        self.dwconv1 = ResDWConv(out_dim)
        self.norm1 = layer_norm(out_dim)
        self.fusion = FoldingSequential(
            DWConv2d(out_dim, 3), nn.BatchNorm2d(out_dim), nn.GELU(),
            nn.Conv2d(out_dim, dim, 1), GRN(dim))
        if mixer == 'contmix':
            self.rpb1 = nn.Parameter(torch.zeros(num_heads, 2 * smk_size - 1, 2 * smk_size - 1))
            self.rpb2 = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
            self.weight_key = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(ctx_dim, dim // 2, 1, bias=False),
                                            nn.BatchNorm2d(dim // 2))
            self.weight_proj = nn.Conv2d(self.num_centres, smk_size ** 2 + kernel_size ** 2, 1)
        else:
            self.static_conv = DWConv2d(dim, kernel_size)
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = FoldingSequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.ls1 = LayerScale(out_dim, ls_init_value)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.dwconv2 = ResDWConv(out_dim)
        self.norm2 = layer_norm(out_dim)
        hidden = int(mlp_ratio * dim)  # NOTE: 3 x C, not 3 x (C + Cc), as in the authors' model
        self.mlp = nn.Sequential(nn.Conv2d(out_dim, hidden, 1), nn.GELU(), ResDWConv(hidden), GRN(hidden),
                                 nn.Conv2d(hidden, out_dim, 1))
        self.ls2 = LayerScale(out_dim, ls_init_value)

    def contmix(self, f: torch.Tensor, zn: torch.Tensor) -> torch.Tensor:
        """Dynamic aggregation of f (B, C, H, W) guided by the normalised [feature, context] map zn."""
        b, c = f.shape[:2]
        ks, sk, g = self.kernel_size, self.smk_size, self.num_heads
        if self.mixer == 'static':
            return self.static_conv(f)
        f0 = f
        f, zn = contmix_fit(f, zn, ks)  # the small-map rule (``contmix_size``)
        hh, ww = f.shape[-2:]
        head_dim = c // (2 * g)
        query = (self.weight_query(zn[:, :self.dim]) * self.scale).reshape(b, g, head_dim, hh * ww)
        key = self.weight_key(zn[:, self.dim:]).reshape(b, g, head_dim, self.num_centres)
        # weight_proj (a 1x1 conv over the 49 pixel-to-centre affinities q.k) folded into the key: W(q.k) = (Wk).q,
        # one matmul per kernel and no (B*G, 49, H, W) affinity map
        proj_w = self.weight_proj.weight.reshape(-1, self.num_centres)
        proj_b = self.weight_proj.bias

        def aggregate(rows: slice, rpb: torch.Tensor, value: torch.Tensor, k: int) -> torch.Tensor:
            # logits laid out (B, G, HW, k*k): the softmax runs over the contiguous last dim; the kernel itself is
            # recomputed in the backward, not kept (``kernel_av``)
            kw = torch.matmul(key, proj_w[rows].t())  # (B, G, d, k*k)
            value = value.reshape(b * g, head_dim, hh, ww)
            return contmix_av(query.transpose(-2, -1), kw, rpb, proj_b[rows], value, k)

        v_small, v_large = self.split(f, c // 2)
        out_small = aggregate(slice(0, sk * sk), self.rpb1, v_small, sk)
        out_large = aggregate(slice(sk * sk, None), self.rpb2, v_large, ks)
        out = self.join(f, out_small.reshape(b, c // 2, hh, ww), out_large.reshape(b, c // 2, hh, ww))
        return contmix_unfit(out, f0)

    def split(self, f: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The value maps of the two kernels: channels [0, k) and [k, C) of f."""
        return f[:, :k], f[:, k:]

    def join(self, like: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The two aggregated halves as one map."""
        return torch.cat([a, b], dim=1)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_ref: torch.Tensor):
        """x: the Focus-Net feature, ctx: the context from the previous block, ctx_ref: the context prior P0 at this
        stage's size. Returns (feature, context), or the [feature, context] map from the stage's last block."""
        if not self.is_first:  # context flow: the previous block's context plus the prior, each layer-scaled
            ctx = self.x_scale(ctx) + self.h_scale(ctx_ref)
        z = self.dwconv1(torch.cat([x, ctx], dim=1))
        zn = self.norm1(z)
        f = self.fusion(zn)
        y = self.dyconv_proj(self.contmix(f, zn)) + self.lepe(f)  # ContMix plus the large-kernel conv (LEPE)
        y = self.proj(self.gate(f) * self.se_layer(y))
        z = self.ls1(z) + self.drop_path(y)
        z = self.dwconv2(z)
        z = self.ls2(z) + self.drop_path(self.mlp(self.norm2(z)))
        if self.is_last:
            return z
        return z[:, :self.dim], z[:, self.dim:]
