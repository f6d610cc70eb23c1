"""OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels.

Meng Lou and Yizhou Yu, CVPR 2025 (arXiv:2502.20087). Original code: https://github.com/LMMMEng/OverLoCK.
Written from the paper and the authors' released model's structure (not copied); parameter names follow the authors'
state_dict so their released checkpoints load unchanged.

Data flow: Base-Net (stem, stages 1-3) -> X (stride 16); Overview-Net (stage 4) -> O (stride 32); context prior
P0 = high_level_proj(O); Focus-Net stage 3 refines X guided by P0 resized to stride 16, ``patch_embedx`` down-samples
feature and context, Focus-Net stage 4 refines at stride 32 -> F (C3 + Cc channels). The main head classifies F, the
optional auxiliary head (deep supervision) classifies O.

One class serves every task: classification (heads), detection (``dense='det'``: per-level LayerNorms plus the
Overview-Net projection ``h_proj`` added to the last map) and segmentation (``dense='seg'``: LayerNorms only).
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices

from .layers import (ContextDownsample, DilatedReparamBlock, DynamicConvBlock, FoldingSequential, LayerScale,
                     RepConvBlock, layer_norm)

# The extended no-decay policy (opt-in): the >1-d parameters that are not kernels (layer scales, GRN gamma/beta,
# relative position tables); timm's rule already exempts 1-d tensors and biases.
_EXTENDED_NO_DECAY = re.compile(r'(^|\.)(rpb1|rpb2|gamma|beta)$|(^|\.)(ls|ls1|ls2|x_scale|h_scale)\.weight$'
                                r'|(^|\.)h_proj\.1\.weight$')

__all__ = ['OverLoCK', 'ARCHS', 'get_arch', 'dense_channels', 'extended_no_weight_decay']

# The variant table (the authors' factory functions). ``test`` is a CPU-sized variant for tests and the demo.
ARCHS: Dict[str, Dict[str, Any]] = {
    'xt': dict(depths=(2, 2, 3, 2), sub_depths=(6, 2), dims=(56, 112, 256, 336), sub_num_heads=(4, 6)),
    't': dict(depths=(4, 4, 6, 2), sub_depths=(12, 2), dims=(64, 128, 256, 512), sub_num_heads=(4, 8)),
    's': dict(depths=(6, 6, 8, 3), sub_depths=(16, 3), dims=(64, 128, 320, 512), sub_num_heads=(8, 16)),
    'b': dict(depths=(8, 8, 10, 4), sub_depths=(20, 4), dims=(80, 160, 384, 576), sub_num_heads=(6, 9)),
    'test': dict(depths=(1, 1, 1, 1), sub_depths=(2, 1), dims=(16, 32, 64, 96), sub_num_heads=(1, 2),
                 projection=128),
}
ARCH_DEFAULTS: Dict[str, Any] = dict(kernel_sizes=(17, 15, 13, 7), smk_size=5, mlp_ratio=4, sub_mlp_ratio=3,
                                     ls_init_values=(None, None, 1.0, 1.0), projection=1024)


def get_arch(arch: Union[str, Dict[str, Any]], **overrides) -> Dict[str, Any]:
    """The full hyper-parameter set of a variant name (or a dict of them), with overrides applied."""
    if isinstance(arch, str):
        key = arch.lower().replace('overlock_', '')
        if key not in ARCHS:
            raise ValueError(f"unknown OverLoCK variant {arch!r}; known: {', '.join(ARCHS)}")
        arch = ARCHS[key]
    cfg = dict(ARCH_DEFAULTS, **arch)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown OverLoCK argument(s) {sorted(unknown)}; architecture keys: {sorted(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def extended_no_weight_decay(model: nn.Module) -> set:
    """Names of the parameters the extended (opt-in) policy also exempts from weight decay: layer scales, GRN
    gamma/beta and the rpb tables, which the authors' timm training decayed. Works on wrapped models too."""
    return {n for n, _ in model.named_parameters() if _EXTENDED_NO_DECAY.search(n)}


def dense_channels(arch: Union[str, Dict[str, Any]]) -> List[int]:
    """Channels of the four dense maps (strides 4/8/16/32)."""
    cfg = get_arch(arch)
    c0, c1, c2, c3 = cfg['dims']
    ctx = c3 // 4
    return [c0, c1, c2 + ctx, c3 + ctx]


def _stem(in_chans: int, dim: int) -> nn.Sequential:
    half = dim // 2
    return FoldingSequential(
        nn.Conv2d(in_chans, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
        nn.Conv2d(half, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
        nn.Conv2d(dim, dim, 3, 1, 1, bias=False), nn.BatchNorm2d(dim))


def _downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    return FoldingSequential(nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim))


class OverLoCK(nn.Module):
    """OverLoCK backbone and classifier.

    Args:
        arch: variant name ('xt', 't', 's', 'b', 'test') or a dict of architecture keys.
        num_classes: classifier width; 0 keeps the head up to the pooled 1024-d projection (timm convention).
        aux_head: build the deep-supervision head on the Overview-Net output. In training mode ``forward`` then
            returns ``(main_logits, aux_logits)`` (use ``overlock_core.losses.DeepSupervisionLoss``); in eval mode it
            returns the main logits only.
        dense: None (classifier), 'det' or 'seg': build the dense-prediction form (no heads, per-level LayerNorms,
            'det' also adds the Overview-Net projection to the stride-32 map).
        out_indices: the dense maps ``forward_dense`` returns.
        deploy: build the re-parameterised form directly (to load ``*_reparam`` checkpoints).
        use_context: False feeds the Focus-Net a zero context (ablation "without Overview-Net context").
        mixer: 'contmix' or 'static' (ablation: ContMix replaced by a static depth-wise K x K conv).
        **arch_overrides: any key of the variant table (depths, sub_depths, dims, kernel_sizes, smk_size,
            sub_num_heads, mlp_ratio, sub_mlp_ratio, ls_init_values, projection).
    """

    def __init__(self, arch: Union[str, Dict[str, Any]] = 't', in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0., aux_head: bool = False,
                 dense: Optional[str] = None, out_indices: Sequence[int] = (0, 1, 2, 3), deploy: bool = False,
                 use_context: bool = True, mixer: str = 'contmix', grad_checkpointing: bool = False,
                 **arch_overrides):
        super().__init__()
        if dense not in (None, 'det', 'seg'):
            raise ValueError(f"dense must be None, 'det' or 'seg', got {dense!r}")
        self._pool(global_pool)  # validates
        cfg = get_arch(arch, **arch_overrides)
        self.arch_cfg = cfg
        depths, sub_depths, dims = cfg['depths'], cfg['sub_depths'], cfg['dims']
        kernels, lsv, heads = cfg['kernel_sizes'], cfg['ls_init_values'], cfg['sub_num_heads']
        if len(depths) != 4 or len(dims) != 4 or len(kernels) != 4 or len(sub_depths) != 2 or len(heads) != 2:
            raise ValueError('OverLoCK needs 4 depths/dims/kernel_sizes and 2 sub_depths/sub_num_heads')
        ctx_dim = dims[3] // 4
        self.dims, self.ctx_dim, self.dense, self.use_context = tuple(dims), ctx_dim, dense, use_context
        self.num_classes, self.drop_rate, self.grad_checkpointing = num_classes, drop_rate, grad_checkpointing
        self.global_pool = global_pool
        self.num_features = dims[3] + ctx_dim
        self.head_hidden_size = cfg['projection']
        self.out_indices = tuple(out_indices)

        n_blocks = sum(depths) + sum(sub_depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]  # linspace, in block order
        offsets = [sum(depths[:i]) for i in range(4)] + [sum(depths), sum(depths) + sub_depths[0]]

        self.patch_embed1 = _stem(in_chans, dims[0])
        for i in range(4):
            if i > 0:
                setattr(self, f'patch_embed{i + 1}', _downsample(dims[i - 1], dims[i]))
            setattr(self, f'blocks{i + 1}', nn.Sequential(*[
                RepConvBlock(dims[i], kernels[i], cfg['mlp_ratio'], lsv[i], dpr[offsets[i] + j], deploy)
                for j in range(depths[i])]))
        self.high_level_proj = nn.Conv2d(dims[3], ctx_dim, 1)
        self.patch_embedx = ContextDownsample(dims[2], dims[3], ctx_dim)
        for s, (dim, ks) in enumerate(((dims[2], kernels[2]), (dims[3], kernels[3]))):
            n = sub_depths[s]
            setattr(self, f'sub_blocks{s + 3}', nn.ModuleList([
                DynamicConvBlock(dim, ctx_dim, ks, cfg['smk_size'], 2 * heads[s], cfg['sub_mlp_ratio'],
                                 lsv[2 + s], dpr[offsets[4 + s] + j], is_first=(s == 0 and j == 0),
                                 is_last=(s == 1 and j == n - 1), deploy=deploy, mixer=mixer)
                for j in range(n)]))

        self.head = self.aux_head = self.extra_norm = self.h_proj = None
        if dense is None:
            self.head = FoldingSequential(
                nn.Conv2d(self.num_features, cfg['projection'], 1, bias=False), nn.BatchNorm2d(cfg['projection']),
                nn.SiLU(), self._pool(global_pool), self._classifier(cfg['projection'], num_classes))
            if aux_head:
                self.aux_head = nn.Sequential(nn.BatchNorm2d(dims[3]), nn.AdaptiveAvgPool2d(1),
                                              self._classifier(dims[3], num_classes))
        else:
            self.num_classes = 0
            norms = [layer_norm(c) for c in dense_channels(cfg)]
            if dense == 'det':
                norms.append(layer_norm(dims[3]))
                self.h_proj = nn.Sequential(nn.Conv2d(dims[3], self.num_features, 1),
                                            LayerScale(self.num_features, 1e-5))
            self.extra_norm = nn.ModuleList(norms)
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(
            dense_channels(cfg), (4, 8, 16, 32), ('blocks1', 'blocks2', 'sub_blocks3', 'sub_blocks4'))]
        self.apply(self._init_weights)

    @staticmethod
    def _classifier(in_dim: int, num_classes: int) -> nn.Module:
        return nn.Conv2d(in_dim, num_classes, 1) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _pool(global_pool: str) -> nn.Module:
        if global_pool not in ('avg', ''):
            raise ValueError(f"OverLoCK pools by average ('avg') or not at all (''), got global_pool={global_pool!r}")
        return nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------- timm hooks
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Groups in execution order (stem, base stages, overview, context, focus stages); heads come last."""
        def blocks(name):
            return rf'^{name}\.' if coarse else [(rf'^{name}\.(\d+)', None)]
        return dict(stem=r'^patch_embed1\.', blocks1=blocks('blocks1'), down2=r'^patch_embed2\.',
                    blocks2=blocks('blocks2'), down3=r'^patch_embed3\.', blocks3=blocks('blocks3'),
                    down4=r'^patch_embed4\.', blocks4=blocks('blocks4'), context=r'^high_level_proj\.',
                    sub_blocks3=blocks('sub_blocks3'), downx=r'^patch_embedx\.', sub_blocks4=blocks('sub_blocks4'))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """None beyond timm's own rule (1-d tensors and biases), as in the authors' training: their model has no
        ``no_weight_decay``, so layer scales, GRN gamma/beta and the rpb tables are decayed. The opt-in extended
        policy exempts those too: ``extended_no_weight_decay(model)``."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[4] if self.head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier (``num_classes`` 0: none); ``global_pool=''`` leaves the projected map unpooled."""
        if self.head is None:
            raise RuntimeError('this OverLoCK has no classifier (a dense det/seg form, or its head was pruned)')
        self.num_classes = num_classes
        if global_pool is not None:
            self.head[3] = self._pool(global_pool)
            self.global_pool = global_pool
        dev = self.head[0].weight.device
        self.head[4] = self._classifier(self.head_hidden_size, num_classes).to(dev)
        if self.aux_head is not None:
            self.aux_head[2] = self._classifier(self.dims[3], num_classes).to(dev)
            self._init_weights(self.aux_head[2])
        self._init_weights(self.head[4])

    @torch.no_grad()
    def reparameterize(self) -> 'OverLoCK':
        """Switch every DilatedReparamBlock to its single-conv deploy form, in place (eval outputs unchanged): the
        authors' deploy form, whose state_dict a ``deploy=True`` model loads. ``timm.utils.reparameterize_model``
        (inference) also folds the BatchNorms into their convs (the blocks' ``reparameterize``), which that format
        cannot hold."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()
        return self

    # ----------------------------------------------------------------------------------------------- forward
    def _run(self, block: nn.Module, *args):
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(block, *args)
        return block(*args)

    def _stage(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = self._run(blk, x)
        return x

    def _forward_all(self, x: torch.Tensor, last: int = 3, norm: bool = False
                     ) -> Tuple[List[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """Run the network; returns the four maps up to index ``last``, the last of them before any output norm (the
        Focus-Net's F when ``last`` is 3) and the Overview-Net output O (None if not reached).

        The dense forms follow the authors' detection/segmentation copies: stage 3 receives the normalised stage-2
        map ``extra_norm[1](stage-2 output)``, which is also their output 1; the classifier passes the raw map on.
        ``norm`` (dense forms only) returns the maps through their output LayerNorms (``h_proj`` added to map 3)."""
        norm = norm and self.extra_norm is not None
        maps = []
        x = self._stage(self.blocks1, self.patch_embed1(x))
        maps.append(self.extra_norm[0](x) if norm else x)
        x = self._stage(self.blocks2, self.patch_embed2(x))
        if self.extra_norm is not None:  # the dense data flow: LN(stage 2) is output 1 and stage 3's input
            normed = self.extra_norm[1](x)
            maps.append(normed if norm else x)
            x = normed
        else:
            maps.append(x)
        if last < 2:
            return maps, x, None
        x = self._stage(self.blocks3, self.patch_embed3(x))
        overview = self._stage(self.blocks4, self.patch_embed4(x))
        if self.use_context:
            ctx_prior = self.high_level_proj(overview)
        else:
            ctx_prior = overview.new_zeros(overview.shape[0], self.ctx_dim, *overview.shape[-2:])
        ctx_ref = F.interpolate(ctx_prior, size=x.shape[-2:], mode='bilinear', align_corners=False)
        ctx = ctx_ref
        for blk in self.sub_blocks3:
            x, ctx = self._run(blk, x, ctx, ctx_ref)
        y = torch.cat([x, ctx], dim=1)
        maps.append(self.extra_norm[2](y) if norm else y)
        if last < 3:
            return maps, y, overview
        x, ctx = self.patch_embedx(x, ctx)
        for blk in self.sub_blocks4:
            out = self._run(blk, x, ctx, ctx_prior)
            x, ctx = (out, None) if blk.is_last else out
        if norm:
            y = self.extra_norm[3](x)
            maps.append(y + self.h_proj(self.extra_norm[4](overview)) if self.h_proj is not None else y)
        else:
            maps.append(x)
        return maps, x, overview

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's feature API. The four maps are stage 1, stage 2, Focus stage 3 ([feature, context]) and the final
        Focus map F. ``norm`` applies the dense form's output LayerNorms (and, for 'det', adds ``h_proj`` of the
        Overview-Net output to the last map); the final features returned beside them are never normalised."""
        if output_fmt != 'NCHW':
            raise ValueError('OverLoCK only produces NCHW features')
        take, max_index = feature_take_indices(4, indices)
        last = max_index if stop_early else 3
        maps, final, _ = self._forward_all(x, last=last, norm=norm)
        inter = [maps[i] for i in take]
        return inter if intermediates_only else (final, inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """The Focus-Net needs the whole Base- and Overview-Net, so only the heads can be pruned."""
        take, _ = feature_take_indices(4, indices)
        if prune_head:
            self.head = self.aux_head = None
            self.num_classes = 0
        return take

    def forward_dense(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The detection/segmentation pyramid: normalised maps at ``out_indices``, in standard (NCHW-contiguous)
        layout. The LayerNorms return channels-last strides, which the convs of a neck keep, and mmcv's RoIAlign
        indexes its input as NCHW without checking: on channels-last maps it pools the wrong values (this is what
        kept the Mask R-CNN demo near AP 0)."""
        maps = self.forward_intermediates(x, self.out_indices, norm=True, intermediates_only=True)
        return tuple(m.contiguous() for m in maps)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_all(x)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Projection (1x1 conv, BN, SiLU) before pooling, as the authors' head; unpooled when ``global_pool=''``."""
        for layer in self.head[:4]:  # one by one: torch.fx cannot trace the sliced Sequential (not a submodule)
            x = layer(x)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        if not pre_logits:
            x = self.head[4](x)
        return x.flatten(1) if self.global_pool else x

    def forward(self, x: torch.Tensor):
        if self.dense is not None:
            return self.forward_dense(x)
        _, final, overview = self._forward_all(x)
        logits = self.forward_head(final)
        if self.aux_head is not None and self.training:
            return logits, self.aux_head(overview).flatten(1)
        return logits


# --------------------------------------------------------------------------------------------------- timm glue
def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: OverLoCK) -> Dict[str, torch.Tensor]:
    """Map a checkpoint (the authors' or ours, classifier or detector/segmentor) onto ``model``'s keys."""
    from ..checkpoint import adapt_state_dict
    return adapt_state_dict(state_dict, model)


def _create_overlock(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    """timm's builder, with weights from a local file only and ``features_only`` through ``forward_intermediates``.

    ``features_only=True`` gives the classifier's network and data flow (the ImageNet model as trained, raw stage
    outputs); add ``dense='det'`` or ``'seg'`` (and ``norm=True`` for the output LayerNorms) for the authors'
    detection/segmentation network."""
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    file = overlay.get('file') or overlay.get('state_dict')
    if pretrained and not file:
        raise ValueError(f'{variant}: no weights can be downloaded here; pass '
                         f'pretrained_cfg_overlay=dict(file=PATH) with a local checkpoint')
    features_only = kwargs.get('features_only', False)
    feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls='getter')
    if features_only:
        feature_cls = kwargs.pop('feature_cls', 'getter')
        if not (feature_cls == 'getter' or isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)):
            raise ValueError(f"{variant}: features_only supports feature_cls='getter' (forward_intermediates), got "
                             f"{feature_cls!r}: the Focus-Net runs beside the Base-Net, so the model is no chain of "
                             f"stages to hook or flatten")
        feature_cfg['feature_cls'] = feature_cls
        feature_cfg.update({k: kwargs.pop(k) for k in ('output_fmt', 'norm') if k in kwargs})
    # Weights are loaded by our safe loader (weights_only, key adaptation, clear mismatch report), not timm's.
    model = build_model_with_cfg(OverLoCK, variant, pretrained=False, feature_cfg=feature_cfg, **kwargs)
    if pretrained:
        from ..checkpoint import load_weights
        net = model.model if features_only else model
        load_weights(net, file, strict=False, allow_new_classifier=True,
                     allow_missing=(r'^extra_norm\.', r'^h_proj\.') if net.dense else ())
    return model


def _cfg(**kwargs) -> Dict[str, Any]:
    return dict(dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.95,
                     interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     first_conv='patch_embed1.0', classifier='head.4', license='apache-2.0',
                     paper_ids='arXiv:2502.20087', origin_url='https://github.com/LMMMEng/OverLoCK'), **kwargs)


# The authors' release files are overlock_{xt,t,s,b}_in1k_224.pth; nothing is downloaded at run time: pass
# pretrained=True, pretrained_cfg_overlay=dict(file=PATH).
default_cfgs = generate_default_cfgs({
    'overlock_xt.in1k': _cfg(crop_pct=0.925),
    'overlock_t.in1k': _cfg(crop_pct=0.95),
    'overlock_s.in1k': _cfg(crop_pct=0.95),
    'overlock_b.in1k': _cfg(crop_pct=0.975),
    'test_overlock.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=0.95),
})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create_overlock('overlock_xt', pretrained, **dict(dict(arch='xt'), **kwargs))


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create_overlock('overlock_t', pretrained, **dict(dict(arch='t'), **kwargs))


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create_overlock('overlock_s', pretrained, **dict(dict(arch='s'), **kwargs))


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create_overlock('overlock_b', pretrained, **dict(dict(arch='b'), **kwargs))


@register_model
def test_overlock(pretrained: bool = False, **kwargs) -> OverLoCK:
    return _create_overlock('test_overlock', pretrained, **dict(dict(arch='test'), **kwargs))
