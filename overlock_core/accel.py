"""Acceleration: faster forms of OverLoCK's modules, as one opt-in layer over the paper-form model.

``accelerate(model, AccelConfig(...))`` swaps, in place, each module of the paper form (``models.layers``) for a
subclass with the same parameters, the same state_dict and the same results (up to float rounding) that computes
them in less memory or time; ``restore(model)`` swaps them back. What the accelerated forms do:

* the memory-lean training form (``AccelConfig.lean``): BatchNorm branches, the MLP chains, the gated output
  projection and BatchNorm + activation pairs run as recomputing functions (``ops.recompute``) that keep one input
  map each (about half the activation memory of plain autograd, a few % more compute). ``lean='max'`` also
  recomputes the MLPs' first 1x1 conv instead of keeping its output; ``lean=False`` keeps plain autograd;
* layouts and forms that are faster on CPUs: the stem's convs channels-last, the MLP chain in groups of images,
  squeeze-excitation's 1x1 convs as matmuls on the pooled vectors, the shortcut of ``ResDWConv`` folded into its
  kernel's centre tap, residual sums in place, and channel splits and joins that keep a map's memory layout.

The launchers (``classification/train.py``, ``validate.py``, ``tools/benchmark.py``, the OpenMMLab backbone) apply
``auto_config``: the accelerated forms on CPUs, the paper form on GPUs. Traced (``torch.fx``), exported or inside
``export.plain_ops()``, accelerated modules run the paper form's forward.
"""
import dataclasses
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, register_notrace_function

from .export import plain_forward, plain_ops_active
from .models.layers import (DilatedReparamBlock, DWConv2d, DynamicConvBlock, FoldingSequential, RepConvBlock,
                            ResDWConv, SEModule)
from .models.overlock import OverLoCK
from .ops import bn_act, bn_branch_sum, conv_mlp, dense_dilated, dw_bn_act_conv, dw_conv2d, gated_bn_conv, image_groups
from .ops.recompute import _format

__all__ = ['AccelConfig', 'accelerate', 'accelerated', 'auto_config', 'form_name', 'resolve', 'restore']

LEAN_LEVELS = (True, False, 'max')


@dataclasses.dataclass(frozen=True)
class AccelConfig:
    """What ``accelerate`` applies. ``lean``: the memory-lean training form, True, 'max' or False (see the module
    docstring)."""
    lean: Union[bool, str] = True

    def __post_init__(self):
        if self.lean not in LEAN_LEVELS:
            raise ValueError(f"lean must be True, False or 'max', got {self.lean!r}")


def auto_config(dense: bool = False, device: Optional[Union[str, torch.device]] = None) -> Optional[AccelConfig]:
    """The launchers' default: on CPUs the accelerated forms, lean for classifiers and 'max' for dense backbones
    (which train at detection and segmentation sizes, where activation memory binds); None (the paper form) on other
    devices. ``device`` defaults to CUDA when it is available, else the CPU."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if torch.device(device).type != 'cpu':
        return None
    return AccelConfig(lean='max' if dense else True)


def resolve(spec, dense: bool = False, device=None) -> Optional[AccelConfig]:
    """An ``AccelConfig`` (or None: the paper form) from a config value: 'auto' (``auto_config``), 'off'/None/False,
    a dict of ``AccelConfig`` fields, or an ``AccelConfig``."""
    if isinstance(spec, AccelConfig):
        return spec
    if spec == 'auto':
        return auto_config(dense, device)
    if spec in (None, False, 'off'):
        return None
    if isinstance(spec, dict):
        unknown = set(spec) - {f.name for f in dataclasses.fields(AccelConfig)}
        if unknown:
            raise ValueError(f'unknown accel option(s) {sorted(unknown)}; known: lean')
        return AccelConfig(**spec)
    raise ValueError(f"accel must be 'auto', 'off', None, a dict such as dict(lean='max') or an AccelConfig, "
                     f"got {spec!r}")


# ----------------------------------------------------------------------------------------------- helpers
def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, in place when that keeps the result's dtype (``fresh`` must be a new tensor no autograd node
    saved): one full-size allocation less per residual; under autocast a bf16 branch plus an fp32 stream stays fp32.
    """
    if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype:
        return fresh.add_(other)
    return fresh + other


def plain_bn(bn: nn.Module) -> bool:
    """A BatchNorm2d normalising with its batch statistics on this process (not SyncBatchNorm, not frozen)."""
    return type(bn) is nn.BatchNorm2d and bn.training and bn.affine


def _plain_ln(m: Optional[nn.Module]) -> bool:
    """A timm LayerNorm2d on its plain kernel (``bn_branch_sum`` reproduces exactly that)."""
    return type(m) is LayerNorm2d and m.elementwise_affine and not getattr(m, '_fast_norm', False)


def _act_name(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.SiLU):
        return 'silu'
    return 'gelu' if isinstance(m, nn.GELU) and m.approximate == 'none' else None


def _dw3x3(m: nn.Module) -> bool:
    return type(m) is DWConv2d and m.kernel_size == (3, 3) and m.dilation == (1, 1)


def _conv1x1(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1 \
        and m.padding == (0, 0)


def _mixed_precision(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.float32, torch.float64)


class Lean:
    """Mixin: the module's lean level (``AccelConfig.lean``), in effect while gradients are recorded and the model
    is not being compiled (the compiler plans its own recomputation)."""
    lean: Union[bool, str] = True

    def recompute(self) -> Union[bool, str]:
        """The lean level in effect now (True, 'max'), or False."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return self.lean


def mlp(seq, x: torch.Tensor, lean: Union[bool, str], se: Optional['FastSE'] = None) -> torch.Tensor:
    """The MLP chain [1x1 conv, GELU, ResDWConv, GRN, 1x1 conv], after ``se`` if given: when ``lean``, one
    recomputing function that keeps x and one hidden map (none when ``lean`` is 'max') instead of the scaled x and
    four hidden maps. Both forms run large CPU maps in groups of images (``ops.image_groups``)."""
    conv1, act, dw, norm, conv2 = seq
    if not lean or act.approximate != 'none':
        def chain(t: torch.Tensor) -> torch.Tensor:
            return conv2(norm(dw(act(conv1(t if se is None else se(t))))))
        groups = [slice(None)] if torch.is_grad_enabled() else image_groups(x, conv1.out_channels)
        return chain(x) if len(groups) == 1 else torch.cat([chain(x[s]) for s in groups])
    residual = _mixed_precision(x)
    wdw = dw.weight if residual else dw.weight + dw.centre
    return conv_mlp(x, conv1.weight, conv1.bias, wdw, dw.bias, norm.gamma, norm.beta, conv2.weight, conv2.bias,
                    residual, scale=None if se is None else se.scale(x), keep_hidden=lean != 'max')


class _ChannelSplit(torch.autograd.Function):
    """x (B, C, H, W) -> x[:, :k], x[:, k:] (made contiguous when asked: ContMix's value maps), whose gradient comes
    back as one map in x's memory layout. Autograd's slice backward would build it NCHW (zero-filled, then added),
    which mixes the layouts of a Focus block's gradients, and mixed layouts are slower on the CPU."""

    @staticmethod
    def forward(ctx, x, k, contiguous):
        ctx.k, ctx.shape, ctx.fmt = k, x.shape, _format(x)  # channels-last or contiguous
        a, b = x[:, :k], x[:, k:]
        return (a.contiguous(), b.contiguous()) if contiguous else (a, b)

    @staticmethod
    def backward(ctx, ga, gb):
        like = ga if ga is not None else gb
        g = torch.empty(ctx.shape, dtype=like.dtype, device=like.device, memory_format=ctx.fmt)
        for part, grad in ((g[:, :ctx.k], ga), (g[:, ctx.k:], gb)):
            part.zero_() if grad is None else part.copy_(grad)
        return g, None, None


def split_channels(x: torch.Tensor, k: int, contiguous: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x[:, :k], x[:, k:]) with the gradient assembled in x's layout (``_ChannelSplit``)."""
    return _ChannelSplit.apply(x, k, contiguous)


@register_notrace_function  # torch.fx: a leaf (item assignment)
def join_channels(like: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b] along the channels, written into a map laid out like ``like`` (torch.cat would make it NCHW, and the
    block's later CPU kernels are slower on maps of mixed layouts); torch.cat while exported."""
    if plain_ops_active():
        return torch.cat([a, b], dim=1)
    out = torch.empty_like(like)
    out[:, :a.shape[1]] = a
    out[:, a.shape[1]:] = b
    return out


# ----------------------------------------------------------------------------------------------- the forms
class Chain(Lean, FoldingSequential):
    """A FoldingSequential that, in training, runs each BatchNorm2d followed by GELU or SiLU as one recomputing
    function (``ops.bn_act``: the BatchNorm output is not kept). A depth-wise 3x3 before the pair and a 1x1 conv
    after it join the function (``ops.dw_bn_act_conv``: neither the BatchNorm input nor the activation output is
    kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_forward() or not self.recompute():
            return super().forward(x)
        mods, i = list(self), 0
        while i < len(mods):
            act = _act_name(mods[i + 2]) if i + 3 < len(mods) else None
            if act and _dw3x3(mods[i]) and plain_bn(mods[i + 1]) and _conv1x1(mods[i + 3]):
                x = dw_bn_act_conv(x, mods[i], mods[i + 1], act, mods[i + 3])
                i += 4
                continue
            act = _act_name(mods[i + 1]) if i + 1 < len(mods) else None
            if act and plain_bn(mods[i]):
                x = bn_act(x, mods[i], act)
                i += 2
            else:
                x = mods[i](x)
                i += 1
        return x


class ChannelsLastStem(Chain):
    """The stem, run channels-last on the CPU (oneDNN's backward of its dense 3x3 convs is up to 2x faster there);
    its output is handed on in the input's layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_forward() or x.device.type != 'cpu' or x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class FastResDWConv(ResDWConv):
    """ResDWConv with the shortcut folded into the kernel's centre tap in full precision: one conv and no full-size
    add (gradients unchanged). Under autocast the kernel would be rounded to 16 bits after the fold, losing most of
    its precision next to the 1, so the shortcut is added separately there."""
    centre: torch.Tensor  # the identity as a kernel: a buffer outside the state_dict, added by ``accelerate``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_forward():
            return super().forward(x)
        if _mixed_precision(x):
            return add_into(dw_conv2d(x, self.weight, self.bias), x)
        return dw_conv2d(x, self.weight + self.centre, self.bias)


class FastSE(SEModule):
    """Squeeze-excitation with its 1x1 convs on the pooled vectors as matmuls: the convolution kernels (and adaptive
    pooling on channels-last maps) cost far more than the arithmetic on 1x1 maps."""

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``proj(x)``, (N, C, 1, 1)."""
        _, fc1, act, fc2, gate = self.proj
        v = x.mean((2, 3))
        v = F.linear(act(F.linear(v, fc1.weight.flatten(1), fc1.bias)), fc2.weight.flatten(1), fc2.bias)
        return gate(v)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_forward():
            return super().forward(x)
        return x * self.scale(x)


class LeanDRB(Lean, DilatedReparamBlock):
    """DilatedReparamBlock whose training form keeps x alone, not one map per branch (``ops.bn_branch_sum``); on the
    CPU wide dilated kernels on small maps run as dense ones (``ops.dense_dilated``), on CUDA the branches can run
    in one Triton launch per pass (``KERNELS.triton_drb``)."""

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """``norm``: the LayerNorm in front of the block, run inside the lean function (its output not kept)."""
        if plain_forward() or self.deploy:
            return super().forward(x if norm is None else norm(x))
        convs, bns = self.convs_and_norms()
        if not (self.recompute() and all(plain_bn(bn) for bn in bns)):
            return super().forward(x if norm is None else norm(x))
        cpu = x.device.type == 'cpu'
        weights, dilations = zip(*(dense_dilated(c.weight, c.dilation[0], x) if cpu else (c.weight, c.dilation[0])
                                   for c in convs))
        if norm is not None and not _plain_ln(norm):
            x, norm = norm(x), None
        return bn_branch_sum(x, weights, dilations, bns, norm)


class LeanRepConvBlock(Lean, RepConvBlock):
    """RepConvBlock through the lean DilatedReparamBlock (its LayerNorm inside) and the lean MLP (its SE inside)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain_forward():
            return super().forward(x)
        x = self.dwconv(x)
        p = self.proj
        y = p[9](mlp(p[4:9], p[2](p[1](x, norm=p[0])), self.recompute(), se=p[3]))  # p[3]: SE, p[4:9]: MLP
        return add_into(y, self.ls(x))


class LeanDynamicConvBlock(Lean, DynamicConvBlock):
    """DynamicConvBlock with the lean gated projection and MLP, in-place residual sums and layout-keeping channel
    splits and joins."""

    def split(self, f: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if plain_forward():
            return super().split(f, k)
        return split_channels(f, k, contiguous=True)

    def join(self, like: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if plain_forward():
            return super().join(like, a, b)
        return join_channels(like, a, b)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_ref: torch.Tensor):
        if plain_forward():
            return super().forward(x, ctx, ctx_ref)
        if not self.is_first:
            # ctx is a channel slice of the previous block's output: scaling a copy lets autograd keep that copy
            # (Cc channels) for the scale's gradient instead of the whole previous output. clone() keeps the slice's
            # layout (a contiguous() copy of a channels-last slice would turn the block's maps NCHW)
            ctx = self.x_scale(ctx.clone() if torch.is_grad_enabled() else ctx) + self.h_scale(ctx_ref)
        z = self.dwconv1(torch.cat([x, ctx], dim=1))
        identity = z
        zn = self.norm1(z)
        f = self.fusion(zn)
        gate = self.gate(f)
        lepe = self.lepe(f)
        y = add_into(self.dyconv_proj(self.contmix(f, zn)), lepe)
        if self.recompute() and plain_bn(self.proj[0]):
            y = gated_bn_conv(y, self.se_layer.scale(y), gate, self.proj[0], self.proj[1])
        else:
            y = self.proj(gate * self.se_layer(y))
        z = add_into(self.ls1(identity), self.drop_path(y))
        z = self.dwconv2(z)
        z = add_into(self.ls2(z), self.drop_path(mlp(self.mlp, self.norm2(z), self.recompute())))
        if self.is_last:
            return z
        return split_channels(z, self.dim)


# paper form -> accelerated form (exact types: a user's own subclass is left as it is)
FORMS: Dict[type, type] = {FoldingSequential: Chain, ResDWConv: FastResDWConv, SEModule: FastSE,
                           DilatedReparamBlock: LeanDRB, RepConvBlock: LeanRepConvBlock,
                           DynamicConvBlock: LeanDynamicConvBlock}
PLAIN: Dict[type, type] = {v: k for k, v in FORMS.items()}
PLAIN[ChannelsLastStem] = FoldingSequential


def _centre(conv: nn.Conv2d) -> torch.Tensor:
    k = conv.kernel_size[0]
    centre = conv.weight.new_zeros(1, 1, k, k)
    centre[..., k // 2, k // 2] = 1
    return centre


def accelerate(model: nn.Module, config: Optional[AccelConfig] = AccelConfig()) -> nn.Module:
    """Swap ``model``'s paper-form modules (anywhere inside it) for their accelerated forms, in place, and set their
    lean level; ``config=None`` restores the paper form. The state_dict, parameters and optimiser state stay
    valid. Returns ``model``."""
    if config is None:
        return restore(model)
    if not isinstance(config, AccelConfig):
        raise TypeError(f'accelerate takes an AccelConfig or None, got {type(config).__name__}')
    for m in list(model.modules()):
        fast = FORMS.get(type(m))
        if fast is not None:
            m.__class__ = fast
            if fast is FastResDWConv:
                m.register_buffer('centre', _centre(m), persistent=False)
        if isinstance(m, OverLoCK) and type(m.patch_embed1) in (FoldingSequential, Chain):
            m.patch_embed1.__class__ = ChannelsLastStem
    for m in model.modules():
        if isinstance(m, Lean):
            m.lean = config.lean
    return model


def restore(model: nn.Module) -> nn.Module:
    """The paper form of every accelerated module of ``model``, in place (the inverse of ``accelerate``)."""
    for m in model.modules():
        plain = PLAIN.get(type(m))
        if plain is None:
            continue
        if type(m) is FastResDWConv:
            del m.centre
        m.__dict__.pop('lean', None)
        m.__class__ = plain
    return model


def accelerated(model: nn.Module) -> Optional[AccelConfig]:
    """The AccelConfig ``model``'s modules run with, or None when it has no accelerated module."""
    levels = {m.lean for m in model.modules() if isinstance(m, Lean)}
    if not levels:
        return None
    if len(levels) > 1:
        raise ValueError(f'modules of this model run at different lean levels {sorted(map(str, levels))}')
    return AccelConfig(lean=levels.pop())


def form_name(model: nn.Module) -> str:
    """How ``model`` runs, for logs and results: 'paper form' or 'accelerated (lean=...)'."""
    config = accelerated(model)
    return 'paper form' if config is None else f'accelerated (lean={config.lean})'
