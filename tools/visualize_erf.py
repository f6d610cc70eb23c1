#!/usr/bin/env python
"""Effective receptive field (ERF) heatmap of a backbone stage, as drawn in the large-kernel ConvNet papers.

Why: OverLoCK's claim is a large ERF with strong inductive bias; the ERF picture (RepLKNet, Ding et al. 2022)
makes it visible and comparable with any timm model (e.g. convnext_tiny). Method: for each input image take
the feature map of the chosen stage, sum the ReLU of its centre pixel over channels, back-propagate to the
input, keep the ReLU of the input gradient summed over colour channels, and average over images. The plot is
log10(1 + map) normalised to [0, 1]; the title gives the side fraction of the smallest centred square holding
20% / 50% / 99% of the total contribution (smaller = more local).

Usage:
  python tools/visualize_erf.py --model overlock_t --stage 3 --num-images 16 --out erf_overlock_t.png
  python tools/visualize_erf.py --model convnext_tiny --stage 3 --images path/to/imgs --size 512
  python tools/visualize_erf.py --model overlock_t --checkpoint ckpt.pth --stage 2
"""
import argparse
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # like tools/dist_*.sh: the repo works before `pip install -e .`
    sys.path.insert(0, str(ROOT))


def build_model(name, checkpoint=None):
    """timm model (OverLoCK variants registered by importing overlock_core), weights via overlock_core."""
    import timm
    try:
        import overlock_core  # noqa: F401  registers overlock_* entrypoints
    except ImportError:
        if 'overlock' in name:
            raise
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if not hasattr(model, 'forward_intermediates'):  # older timm families: module-by-module feature wrapper
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-4, -3, -2, -1))
    if checkpoint:
        from overlock_core.checkpoint import load_weights
        load_weights(model, checkpoint, strict=False)
    return model.eval()


def stage_features(model, x, stage):
    """Feature map (N, C, H, W) of one stage: forward_intermediates, else the features_only wrapper's list."""
    if hasattr(model, 'forward_intermediates'):
        # Negative index: the last four feature levels, so stage 0..3 also works for 5-level models (ResNet).
        return model.forward_intermediates(x, indices=[stage - 4], intermediates_only=True)[-1]
    return model(x)[stage - 4]


def load_images(spec, n, size, mean, std, seed):
    """A batch iterator: images from a dir/glob (resized, normalised) or N(0, 1) noise in normalised space."""
    if spec:
        from PIL import Image
        files = sorted(glob.glob(os.path.join(spec, '*')) if os.path.isdir(spec) else glob.glob(spec))
        files = [f for f in files if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp', '.webp'))][:n]
        if not files:
            raise SystemExit(f'visualize_erf: no images found at {spec!r}')
        for f in files:
            img = np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BICUBIC), np.float32) / 255
            t = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) \
                / torch.tensor(std)[:, None, None]
            yield t[None]
    else:
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            yield torch.randn(1, 3, size, size, generator=g)


def compute_erf(model, images, stage):
    """Mean over images of ReLU(d centre / d input), summed over input channels: (H, W) numpy array."""
    acc, count = None, 0
    for x in images:
        x = x.clone().requires_grad_(True)
        fmap = stage_features(model, x, stage)
        h, w = fmap.shape[-2:]
        centre = torch.relu(fmap[:, :, h // 2, w // 2]).sum()
        (grad,) = torch.autograd.grad(centre, x)
        contrib = torch.relu(grad)[0].sum(0).numpy()
        acc = contrib if acc is None else acc + contrib
        count += 1
    return acc / max(count, 1)


def area_ratio(erf, thresholds=(0.2, 0.5, 0.99)):
    """Side of the smallest square around the ERF's centroid holding t of the total, as a fraction of the image."""
    h, w = erf.shape
    total, out = erf.sum(), []
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (int(round((g * erf).sum() / max(total, 1e-12))) for g in (yy, xx))
    for t in thresholds:
        r = 1
        while r < max(h, w):
            if erf[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1].sum() >= t * total:
                break
            r += 1
        out.append(min(1.0, (2 * r + 1) / max(h, w)))
    return out


def plot_erf(erf, out, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    data = np.log10(erf / max(erf.max(), 1e-12) * 1e3 + 1)  # RepLKNet-style log scaling, bounded dynamic range
    data = data / max(data.max(), 1e-12)
    fig, ax = plt.subplots(figsize=(5, 5.3))
    im = ax.imshow(data, cmap='RdYlGn', vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='overlock_t', help='timm model name (overlock_xt/t/s/b, convnext_tiny, ...)')
    p.add_argument('--stage', type=int, default=3, choices=range(4), help='stage whose centre pixel is used')
    p.add_argument('--size', type=int, default=224, help='input side (RepLKNet used 1024; 224 fits a CPU)')
    p.add_argument('--num-images', type=int, default=8)
    p.add_argument('--images', default=None, help='dir or glob of images (default: Gaussian noise inputs)')
    p.add_argument('--checkpoint', default=None, help='weights, loaded with overlock_core.checkpoint.load_weights')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='PNG path (default: outputs/erf/<model>_stage<k>.png)')
    p.add_argument('--save-npy', action='store_true', help='also save the raw ERF array next to the PNG')
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint)
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))
    images = load_images(args.images, args.num_images, args.size, mean, std, args.seed)
    erf = compute_erf(model, images, args.stage)
    ratios = area_ratio(erf)
    out = args.out or f'outputs/erf/{args.model}_stage{args.stage}.png'
    src = 'noise' if not args.images else Path(args.images).name
    title = (f'ERF {args.model} stage {args.stage} ({args.size}px, {args.num_images} {src} images)\n'
             f'square side holding 20/50/99%: ' + ' / '.join(f'{r:.2f}' for r in ratios))
    plot_erf(erf, out, title)
    if args.save_npy:
        np.save(Path(out).with_suffix('.npy'), erf)
    print(f'[visualize_erf] {out}  (20/50/99% square side fractions: {", ".join(f"{r:.3f}" for r in ratios)})')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
