#!/usr/bin/env python
"""Parameters and FLOPs of every OverLoCK variant next to the paper's figures, and of detectors/segmentors.

Counting convention (stated in every table): multiply-accumulates (MACs, what papers call "FLOPs"), counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls/einsums; FlopCounterMode's FLOPs / 2) plus the
ContMix neighbourhood aggregation added exactly (heads x H x W x k^2 x c per branch). Norms, activations, pooling,
softmax and interpolation are not counted. Three columns:
  deploy   - the re-parameterised model (what inference runs), aggregation included;
  train    - the training form (all DilatedReparamBlock branches);
  paper    - the training form without the large-kernel ``lk_origin`` convs: the authors' counter did not see them
             (they run through a custom iGEMM op), which is how the paper's 2.6/5.5/9.7/16.7 G arise.
Params: training form with the aux head, and deploy form without it (the paper's 16/33/56/95 M).

  python tools/complexity.py                       # the variant table at 224x224
  python tools/complexity.py --dense 800 1280 512 512   # + backbone figures at these sizes
  python tools/complexity.py --config configs/det/overlock_t_maskrcnn_1x.py --size 800 1280
  python tools/complexity.py --json out.json
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import overlock_core  # noqa: F401
from overlock_core.models import OverLoCK
from overlock_core.models import layers
from overlock_core.models.layers import DilatedReparamBlock, DynamicConvBlock, contmix_size

PAPER = {'xt': (16, 2.6, 82.7), 't': (33, 5.5, 84.2), 's': (56, 9.7, 84.8), 'b': (95, 16.7, 85.1)}


def _na2d_hooks(model: nn.Module, store: List[float], proj: List[float]):
    """Add the aggregation's MACs (FlopCounterMode cannot see inside the custom autograd op's loop), and count the
    kernel projection as the paper's model computes it: affinities q.k (49 per pixel and head), then a 1x1 conv
    to k*k + K*K. Ours folds the conv into the key first (fewer MACs); the difference goes into ``proj``."""
    def hook(mod: DynamicConvBlock, args, out):
        if mod.mixer != 'contmix':
            return
        x = args[0]
        h, w = contmix_size(*x.shape[-2:], mod.kernel_size)  # small-map rule: computed at the resized size
        half, n, hw = mod.dim // 2, mod.num_centres, h * w
        taps = mod.smk_size ** 2 + mod.kernel_size ** 2
        store.append(x.shape[0] * half * hw * taps)
        paper = half * n * hw + mod.num_heads * n * taps * hw
        proj.append(x.shape[0] * (paper - (half * n * taps + taps * half * hw)))
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DynamicConvBlock)]


def _lk_hooks(model: nn.Module, store: List[float]):
    def hook(mod: nn.Conv2d, args, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        store.append(out.numel() * k * mod.in_channels // mod.groups)
    return [m.lk_origin.register_forward_hook(hook) for m in model.modules() if isinstance(m, DilatedReparamBlock)]


def _logits_only(q, kw, rpb, pb, value, k):
    torch.matmul(q, kw)  # the kernel logits, counted by FlopCounterMode
    return torch.zeros_like(value)


@torch.no_grad()
def count_macs(model: nn.Module, inputs, forward=None) -> Tuple[float, float, float]:
    """(MACs counted by FlopCounterMode + aggregation, aggregation MACs, lk_origin MACs)."""
    na2d, lk, proj = [], [], []
    handles = _na2d_hooks(model, na2d, proj) + _lk_hooks(model, lk)
    # The aggregation's internal banded matmuls are an implementation detail: count its exact MACs (hooks above) and
    # skip its computation (values do not change any count); the kernel logits q @ kw are counted as computed.
    real_op, layers.kernel_av = layers.kernel_av, _logits_only
    try:
        with FlopCounterMode(display=False) as counter:
            (forward or model)(*inputs) if isinstance(inputs, tuple) else (forward or model)(inputs)
    finally:
        layers.kernel_av = real_op
        for h in handles:
            h.remove()
    return counter.get_total_flops() / 2 + sum(na2d) + sum(proj), sum(na2d), sum(lk)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def variant_row(arch: str, size: int = 224) -> Dict[str, float]:
    x = torch.randn(1, 3, size, size)
    train = OverLoCK(arch, aux_head=True).eval()
    p_train = n_params(train)
    m_train, agg, lk = count_macs(train, x)
    train.aux_head = None
    train.reparameterize()
    m_dep, _, _ = count_macs(train, x)
    row = dict(variant=arch, params_train=p_train, params_deploy=n_params(train), gmacs_deploy=m_dep / 1e9,
               gmacs_train=m_train / 1e9, gmacs_paper_convention=(m_train - lk) / 1e9, gmacs_na2d=agg / 1e9)
    if arch in PAPER:
        row.update(paper_params_m=PAPER[arch][0], paper_gflops=PAPER[arch][1], paper_top1=PAPER[arch][2])
    return row


def dense_row(arch: str, dense: str, h: int, w: int) -> Dict[str, float]:
    model = OverLoCK(arch, dense=dense).eval()
    macs, _, _ = count_macs(model, torch.randn(1, 3, h, w))
    return dict(variant=arch, form=dense, size=f'{h}x{w}', params=n_params(model), gmacs=macs / 1e9)


def config_row(config: str, h: int, w: int) -> Dict[str, float]:
    """Whole detector/segmentor from an OpenMMLab config (init_cfg dropped, nothing loaded)."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, init_default_scope
    import overlock_core.mm  # noqa: F401
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    from mmengine.registry import MODELS
    cfg.model.backbone.pop('init_cfg', None)
    if cfg.model.get('type') == 'EncoderDecoder':
        cfg.model.pop('pretrained', None)
    model = MODELS.build(cfg.model).eval()
    x = torch.randn(1, 3, h, w)
    scope = DefaultScope.get_current_instance().scope_name
    if scope == 'mmseg':
        fwd = lambda inp: model._forward(inp)  # noqa: E731  encoder-decoder logits
    else:
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.),
                                             pad_shape=(h, w), batch_input_shape=(h, w)))
        fwd = lambda inp: model._forward(inp, [sample])  # noqa: E731
    macs, _, _ = count_macs(model, x, forward=fwd)
    bb = n_params(model.backbone)
    return dict(config=os.path.basename(config), size=f'{h}x{w}', params=n_params(model), backbone_params=bb,
                gmacs=macs / 1e9)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--variants', nargs='*', default=['xt', 't', 's', 'b'], help='none: skip the variant table')
    ap.add_argument('--size', type=int, nargs='+', default=[224], help='classification size, or H W for --config')
    ap.add_argument('--dense', type=int, nargs='*', default=[], help='pairs H W for backbone figures')
    ap.add_argument('--config', nargs='*', default=[], help='mmdet/mmseg configs to count whole models')
    ap.add_argument('--json', help='also write the rows as JSON')
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    out: Dict[str, list] = dict(variants=[], dense=[], models=[])
    if args.variants:
        print('OverLoCK at %dx%d  (MACs; FlopCounterMode convs/matmuls + exact ContMix aggregation)'
              % ((args.size[0],) * 2))
        print(f"{'variant':8}{'params train':>14}{'params deploy':>15}{'paper':>7}{'G deploy':>10}{'G train':>9}"
              f"{'G paper-conv.':>15}{'paper G':>9}{'na2d G':>8}")
    for arch in args.variants:
        r = variant_row(arch, args.size[0])
        out['variants'].append(r)
        print(f"{arch:8}{r['params_train'] / 1e6:13.2f}M{r['params_deploy'] / 1e6:14.2f}M"
              f"{str(r.get('paper_params_m', '-')) + 'M':>7}{r['gmacs_deploy']:10.2f}{r['gmacs_train']:9.2f}"
              f"{r['gmacs_paper_convention']:15.2f}{r.get('paper_gflops', float('nan')):9.1f}{r['gmacs_na2d']:8.3f}")
        sys.stdout.flush()
    pairs = list(zip(args.dense[::2], args.dense[1::2]))
    if pairs:
        print('\nDense backbones (training form; det adds h_proj and a 5th norm)')
        for h, w in pairs:
            for arch in args.variants:
                for dense in ('det', 'seg'):
                    r = dense_row(arch, dense, h, w)
                    out['dense'].append(r)
                    print(f"{arch:4}{dense:5}{r['size']:>10}{r['params'] / 1e6:10.2f}M{r['gmacs']:10.1f} G")
                    sys.stdout.flush()
    if args.config:
        h, w = (args.size + args.size)[:2] if len(args.size) > 1 else (800, 1280)
        print(f'\nWhole models at {h}x{w}')
        for cfg in args.config:
            r = config_row(cfg, h, w)
            out['models'].append(r)
            print(f"{r['config']:48}{r['params'] / 1e6:9.2f}M{r['gmacs']:10.1f} G  (backbone {r['backbone_params'] / 1e6:.2f}M)")
            sys.stdout.flush()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
        print(f'wrote {args.json}')
    return out


if __name__ == '__main__':
    main()
