"""``OverLoCKBackbone``: the mmdet/mmseg face of :class:`overlock_core.models.OverLoCK`.

A thin subclass (no second copy of the network): it adds the OpenMMLab backbone interface -- ``out_indices``,
``frozen_stages``, ``norm_eval``, ``with_cp``, ``init_cfg`` -- and returns a tuple of NCHW maps (strides 4/8/16/32).
Registered once in ``mmengine.registry.MODELS``; mmdet and mmseg registries are children of it, so the same type
name works under ``default_scope='mmdet'`` and ``'mmseg'``.

Weights: ``init_cfg=dict(type='Pretrained', checkpoint=PATH[, prefix='backbone.'])`` loads

* an ImageNet checkpoint of ours or of the authors (``head.*`` / ``aux_head.*`` dropped; the dense-only modules
  ``extra_norm.*`` / ``h_proj.*`` may be absent and keep their fresh initialisation),
* a detector / segmentor checkpoint (keys under ``backbone.``; everything else in it is ignored).

Any other missing backbone key, and any shape mismatch, raises :class:`overlock_core.checkpoint.CheckpointError`
naming the keys -- unlike mmengine's ``load_checkpoint``, which loads non-strictly and only logs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from overlock_core.accel import accelerate, resolve
from overlock_core.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_weights
from overlock_core.models import OverLoCK

__all__ = ['OverLoCKBackbone', 'load_backbone_weights']

# modules that only exist in the dense (det/seg) model: may be missing from an ImageNet checkpoint
DENSE_ONLY = (r'^extra_norm\.', r'^h_proj\.')
# frozen_stages=k freezes entries 0..k: 0 = stem; 1..4 = Base-/Overview-Net stages (down-sampling + blocks, plus
# the output norm of the map a stage emits directly). The Focus-Net (context projection, sub_blocks) is never frozen.
STAGE_PREFIXES = (
    ('patch_embed1.',),
    ('blocks1.', 'extra_norm.0.'),
    ('patch_embed2.', 'blocks2.', 'extra_norm.1.'),
    ('patch_embed3.', 'blocks3.'),
    ('patch_embed4.', 'blocks4.'),
)


def _logger() -> MMLogger:
    return MMLogger.get_current_instance()


def load_backbone_weights(model: nn.Module, src: Union[str, Dict[str, Any]], prefix: Optional[str] = None,
                          use_ema: bool = False) -> Dict[str, list]:
    """Load an ImageNet / det / seg checkpoint (file or dict) into an ``OverLoCKBackbone``.

    ``prefix``: keep only keys under it (stripped), like mmengine's ``PretrainedInit``; without it a whole
    detector/segmentor checkpoint is reduced to its ``backbone.`` keys automatically. Missing keys other than the
    dense-only modules, and mis-shaped tensors, raise :class:`CheckpointError` naming them.
    """
    if prefix:
        obj = load_checkpoint_file(src) if isinstance(src, str) else src
        sd = extract_state_dict(obj, use_ema)
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sub:
            raise CheckpointError(f"{src if isinstance(src, str) else 'state dict'}: no key starts with "
                                  f"prefix '{prefix}'")
        src = sub
    out = load_weights(model, src, strict=False, use_ema=use_ema, allow_missing=DENSE_ONLY)
    if out['missing']:
        print_log('OverLoCKBackbone: newly initialised (dense-only) keys: ' + ', '.join(out['missing'][:8])
                  + (' ...' if len(out['missing']) > 8 else ''), logger=_logger())
    if out['unexpected']:
        print_log('OverLoCKBackbone: ignored unexpected keys: ' + ', '.join(out['unexpected'][:8])
                  + (' ...' if len(out['unexpected']) > 8 else ''), logger=_logger(), level=logging.WARNING)
    return out


@MODELS.register_module()
class OverLoCKBackbone(OverLoCK):
    """OverLoCK dense-prediction backbone for mmdet 3.x / mmseg 1.x.

    Args:
        arch: variant name (``'xt'``, ``'t'``, ``'s'``, ``'b'``, the CPU-sized test variant) or an arch dict,
            passed to :class:`overlock_core.models.OverLoCK`.
        dense: ``'det'`` (output 3 also receives the Overview-Net features through ``h_proj``) or ``'seg'``
            (four output norms, no ``h_proj``), as in the official detection / segmentation copies.
        out_indices: which of the four maps (strides 4, 8, 16, 32) to return.
        drop_path_rate: stochastic depth rate.
        frozen_stages: -1 trains everything; ``k >= 0`` freezes the stem and stages ``1..k`` (parameters get
            ``requires_grad=False`` and their BN layers stay in eval mode).
        norm_eval: keep every BatchNorm in eval mode during training (frozen running statistics).
        with_cp: gradient checkpointing of the blocks (saves memory, costs time).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH, prefix=None, use_ema=False)``; see the module
            docstring (``use_ema`` picks ``state_dict_ema`` of a timm/our classification checkpoint).
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
        accel: the faster module forms of ``overlock_core.accel``: 'auto' (on a machine without CUDA the
            accelerated forms with ``lean='max'``, no hidden MLP map kept at dense sizes; the paper form otherwise),
            'off', or a dict such as ``dict(lean=True)``. Results are the same either way.
        **kwargs: further :class:`OverLoCK` arguments (``kernel_sizes``, ``use_context``, ``mixer``, ...).
    """

    def __init__(self, arch: Union[str, dict] = 't', dense: str = 'det', out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.2, frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 init_cfg: Optional[dict] = None, pretrained: Optional[str] = None, accel='auto', **kwargs):
        if dense not in ('det', 'seg'):
            raise ValueError(f"dense must be 'det' or 'seg', got {dense!r}")
        out_indices = tuple(int(i) % 4 for i in out_indices)
        if not out_indices or len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices must be distinct indices into the 4 maps, got {out_indices}')
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be in [-1, 4], got {frozen_stages}')
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either init_cfg or pretrained, not both')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a path string, got {type(pretrained).__name__}')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if init_cfg is not None and not isinstance(init_cfg, dict):
            raise TypeError(f'init_cfg must be a dict or None, got {type(init_cfg).__name__}')
        accel = resolve(accel, dense=True)
        super().__init__(arch, num_classes=0, dense=dense, out_indices=out_indices, drop_path_rate=drop_path_rate,
                         **kwargs)
        self.arch_name = arch
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.init_cfg = init_cfg
        if with_cp:
            self.set_grad_checkpointing(True)
        self._freeze_stages()
        accelerate(self, accel)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of the returned maps (what ``neck.in_channels`` / ``decode_head.in_channels`` must be)."""
        return tuple(self.feature_info[i]['num_chs'] for i in self.out_indices)  # honours dims overrides

    def _frozen_prefixes(self) -> Tuple[str, ...]:
        return tuple(p for stage in STAGE_PREFIXES[:self.frozen_stages + 1] for p in stage)

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        prefixes = self._frozen_prefixes()
        for name, param in self.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad = False
        for name, mod in self.named_modules():
            if name.startswith(prefixes):
                mod.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for mod in self.modules():
                if isinstance(mod, _BatchNorm):
                    mod.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Apply ``init_cfg`` (called by the parent detector/segmentor's ``init_weights``)."""
        cfg = self.init_cfg
        if not cfg:
            return
        if cfg.get('type') != 'Pretrained':
            raise ValueError(f"OverLoCKBackbone only supports init_cfg type 'Pretrained', got {cfg.get('type')!r} "
                             '(the network initialises itself in its constructor)')
        path = cfg.get('checkpoint')
        if not path:
            raise ValueError("init_cfg type 'Pretrained' needs a 'checkpoint' path")
        load_backbone_weights(self, str(path), prefix=cfg.get('prefix'), use_ema=bool(cfg.get('use_ema', False)))
        print_log(f'OverLoCKBackbone: loaded {path}', logger=_logger())
        self._is_init = True

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.forward_dense(x)  # normalised maps at self.out_indices
