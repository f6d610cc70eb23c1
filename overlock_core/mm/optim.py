"""Optimizer parameter groups for OverLoCK detectors / segmentors (mmengine optim-wrapper constructor).

Two policies, chosen with ``paramwise_cfg=dict(official=...)``:

``official=True`` (default: the authors' recipe)
    The authors' mmdet 2.x / mmseg 0.x fine-tuning groups, exactly: the stock default constructor with
    ``custom_keys={'absolute_pos_embed', 'relative_position_bias_table', 'norm'} -> decay_mult 0``. Those are
    substring matches on the parameter name, so in OverLoCK they only catch the LayerNorms named ``norm1``/``norm2``
    and ``extra_norm``; BN weights, biases, ``rpb`` tables, layer scales and GRN are decayed. One param group per
    parameter, as in mmcv's constructor.

``official=False`` (opt-in deviation)
    No weight decay for every parameter that is not a weight matrix/kernel: all biases, all normalisation
    parameters (BatchNorm/SyncBN, LayerNorm, LayerNorm2d, GroupNorm, ...), the parameters of
    ``overlock_core.models.extended_no_weight_decay`` (GRN ``gamma``/``beta``, the layer scales ``ls``, ``ls1``,
    ``ls2``, ``x_scale``, ``h_scale`` and the det-only ``h_proj.1``, the ContMix relative position-bias tables
    ``rpb1``/``rpb2``: the same set as classification's ``decay_groups: extended``), and anything the backbone
    lists in ``no_weight_decay()``. timm's rule for 1-d parameters, extended to these and applied consistently.

Both accept mmengine's ``custom_keys`` (``lr_mult`` / ``decay_mult`` by longest matching substring), applied on
top of the policy. Registered in ``mmengine.registry.OPTIM_WRAPPER_CONSTRUCTORS`` so mmdet and mmseg configs
reach it with ``optim_wrapper=dict(constructor='OverLoCKOptimWrapperConstructor', ...)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch.nn as nn
from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from overlock_core.models import extended_no_weight_decay

__all__ = ['OverLoCKOptimWrapperConstructor', 'OFFICIAL_CUSTOM_KEYS', 'is_no_decay']

# the authors' det/seg configs (Swin-style keys; only 'norm' matches anything in OverLoCK)
OFFICIAL_CUSTOM_KEYS = {
    'absolute_pos_embed': dict(decay_mult=0.),
    'relative_position_bias_table': dict(decay_mult=0.),
    'norm': dict(decay_mult=0.),
}


def _is_norm_module(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm
    if isinstance(module, (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)):
        return True
    name = type(module).__name__
    return 'Norm' in name or name in ('GRN', 'GlobalResponseNorm')


def is_no_decay(param_name: str, module: nn.Module, extra_names: Iterable[str] = ()) -> bool:
    """Whether ``param_name`` (full dotted name; ``module`` is its direct owner) is exempt from weight decay under
    the extended policy: a bias, a normalisation parameter, or one of ``extra_names`` (full names)."""
    return param_name in extra_names or param_name.rpartition('.')[2] == 'bias' or _is_norm_module(module)


def _backbone_no_weight_decay(model: nn.Module) -> Set[str]:
    """Full names from ``model.backbone.no_weight_decay()`` (timm convention) if the backbone has it."""
    out: Set[str] = set()
    for prefix, mod in (('backbone.', getattr(model, 'backbone', None)), ('', model)):
        fn = getattr(mod, 'no_weight_decay', None) if mod is not None else None
        if callable(fn):
            try:
                names = fn()
            except Exception:  # noqa: BLE001 - optional hook, never fatal
                continue
            out.update(prefix + n for n in names)
    return out


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class OverLoCKOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Optim-wrapper constructor with OverLoCK's no-decay policy (see module docstring).

    Args:
        optim_wrapper_cfg: as for :class:`DefaultOptimWrapperConstructor`.
        paramwise_cfg: ``official`` (bool, default True) selects the authors' groups, False the extended policy;
            ``custom_keys`` (mmengine semantics) is applied on top; ``no_decay_keys`` (tuple of substrings) adds name
            patterns exempt from decay (ours only).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        self.official = bool(paramwise_cfg.get('official', True))
        paramwise_cfg['official'] = self.official  # never empty: the stock __call__ skips add_params otherwise
        self.no_decay_keys: Tuple[str, ...] = tuple(paramwise_cfg.pop('no_decay_keys', ()))
        if self.official:
            custom_keys = dict(OFFICIAL_CUSTOM_KEYS)
            custom_keys.update(paramwise_cfg.get('custom_keys', {}))
            paramwise_cfg['custom_keys'] = custom_keys
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    # ------------------------------------------------------------------------------------------------------------
    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '', is_dcn_module=None) -> None:
        if self.official:  # stock mmengine behaviour == mmcv 1.x DefaultOptimizerConstructor (one group per param)
            super().add_params(params, module, prefix, is_dcn_module)
            return
        if prefix:  # only ever called at the top level by __call__
            raise ValueError('OverLoCKOptimWrapperConstructor.add_params expects the whole model')
        custom_keys: Dict[str, dict] = self.paramwise_cfg.get('custom_keys', {})
        sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
        extra = _backbone_no_weight_decay(module) | extended_no_weight_decay(module)
        groups: Dict[Tuple[float, float], dict] = {}
        seen: Set[int] = set()
        n_decay = n_nodecay = 0
        for mod_name, mod in module.named_modules():
            for p_name, param in mod.named_parameters(recurse=False):
                if id(param) in seen:  # shared parameters: first owner wins
                    continue
                seen.add(id(param))
                name = f'{mod_name}.{p_name}' if mod_name else p_name
                no_decay = is_no_decay(name, mod, extra) or any(k in name for k in self.no_decay_keys)
                lr_mult, decay_mult = 1.0, (0.0 if no_decay else 1.0)
                for key in sorted_keys:
                    if key in name:
                        lr_mult = custom_keys[key].get('lr_mult', 1.0)
                        decay_mult = decay_mult * custom_keys[key].get('decay_mult', 1.0)
                        break
                group = groups.get((lr_mult, decay_mult))
                if group is None:
                    group = groups[(lr_mult, decay_mult)] = {'params': [], 'param_names': []}
                    if self.base_lr is not None:
                        group['lr'] = self.base_lr * lr_mult
                    if self.base_wd is not None:
                        group['weight_decay'] = self.base_wd * decay_mult
                group['params'].append(param)
                group['param_names'].append(name)
                if decay_mult == 0:
                    n_nodecay += param.numel()
                else:
                    n_decay += param.numel()
        # decayed groups first, so the logged lr/wd of group 0 is the "main" group
        for key in sorted(groups, key=lambda k: (-k[1], -k[0])):
            params.append(groups[key])
        print_log(f'OverLoCKOptimWrapperConstructor: {len(groups)} param groups, {n_decay / 1e6:.2f}M decayed, '
                  f'{n_nodecay / 1e6:.3f}M without weight decay', logger=MMLogger.get_current_instance())
