#!/usr/bin/env python
"""Generate the embedded demo data: tiny synthetic classification, COCO and ADE20K-style sets.

Why synthetic: the demo and the tests must run offline, in minutes, on a CPU, and still exercise the real
dataset classes. Shapes (circle / square / triangle, plus a stripes texture for classification) of random
size, position, rotation and (class-tied, jittered) colour on noisy backgrounds are easy enough to learn in a few epochs and hard
enough that an untrained model scores at chance.

Everything is drawn from one seeded numpy generator per split and written with PIL, so the same seed gives
byte-identical files. Layout (see the contract):
    OUT/cls/{train,val}/<class>/*.png                              ImageFolder, 4 classes, 64x64
    OUT/coco/{train,val}/*.png + OUT/coco/annotations/instances_{train,val}.json   polygons, 128x128
    OUT/ade/images/{training,validation}/*.jpg + OUT/ade/annotations/{training,validation}/*.png
                                                  label value = index in SEG_CLASSES: 0 = background, 1..3 = shapes
Usage: python tools/make_demo_data.py --out demo_data [--seed 0]
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CLS_CLASSES = ('circle', 'square', 'triangle', 'stripes')
SHAPE_CLASSES = ('circle', 'square', 'triangle')  # COCO category ids 1..3, ADE labels 1..3
# Segmentation classes, in label-map order. Background is a class of its own, trained and scored like the shapes,
# so the demo's mIoU and its prediction picture describe the same thing (no pixel is left out of either).
SEG_CLASSES = ('background',) + SHAPE_CLASSES


# Each class has a colour family (jittered): shape is the main cue, colour a loose second one, so the tiny demo
# models show learning within minutes (shape alone took a ResNet-18 longer than the demo's budget).
CLASS_COLOURS = np.array([(225, 70, 60), (70, 205, 80), (70, 110, 235), (230, 205, 60)])


def _class_colour(rng, k):
    return np.clip(CLASS_COLOURS[k] + rng.integers(-40, 41, 3), 0, 255)


def _background(rng, size):
    """A dark random colour, a gentle gradient and pixel noise: the model must not key on the background."""
    base = rng.integers(0, 110, 3).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    grad = rng.uniform(-30, 30, 3).astype(np.float32)
    axis = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    img = base + axis * grad + rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 255)


def _shape_polygon(rng, kind, cx, cy, r):
    """Integer polygon (N, 2) of a shape with circumradius r; circles are 24-gons so masks == polygons."""
    theta0 = rng.uniform(0, 2 * np.pi)
    n = {'circle': 24, 'square': 4, 'triangle': 3}[kind]
    if kind == 'circle':
        theta0 = 0.0
    ang = theta0 + np.arange(n) * 2 * np.pi / n
    pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
    return np.round(pts).astype(np.int32)


def _stripes(rng, img, col, cx, cy, r):
    """A disc-shaped patch of parallel stripes at a random angle and period (texture, not shape)."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(4, 8)
    phase = (xx * np.cos(ang) + yy * np.sin(ang)) / period
    on = (np.floor(phase) % 2 == 0) & ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r)
    img[on] = col


def _cls_image(rng, label, size=64):
    img = _background(rng, size)
    col = _class_colour(rng, label)
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if CLS_CLASSES[label] == 'stripes':
        _stripes(rng, img, col, cx, cy, r)
    else:
        poly = _shape_polygon(rng, CLS_CLASSES[label], cx, cy, r)
        cv2.fillPoly(img, [poly], col.tolist())
    return img.astype(np.uint8)


def _scene(rng, size=128):
    """One image with 1-4 non-overlapping shapes; returns (image, label map, [(class_idx, polygon)])."""
    img = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    objs, placed = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(50):
            r = rng.uniform(10, 26)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        k = int(rng.integers(0, len(SHAPE_CLASSES)))
        poly = _shape_polygon(rng, SHAPE_CLASSES[k], cx, cy, r)
        cv2.fillPoly(img, [poly], _class_colour(rng, k).tolist())
        cv2.fillPoly(label, [poly], k + 1)  # SEG_CLASSES index (0 = background)
        objs.append((k, poly))
    return img.astype(np.uint8), label, objs


def _save(arr, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def make_cls(out, seed, n_train, n_val):
    for s, (split, n) in enumerate((('train', n_train), ('val', n_val))):
        rng = np.random.default_rng([seed, 1, s])
        for label, name in enumerate(CLS_CLASSES):
            for i in range(n):
                _save(_cls_image(rng, label), out / 'cls' / split / name / f'{name}_{i:04d}.png')


def make_coco(out, seed, n_train, n_val):
    cats = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(SHAPE_CLASSES)]
    for s, (split, n) in enumerate((('train', n_train), ('val', n_val))):
        rng = np.random.default_rng([seed, 2, s])
        images, anns = [], []
        for i in range(n):
            img, _, objs = _scene(rng)
            name = f'{split}_{i:04d}.png'
            _save(img, out / 'coco' / split / name)
            images.append(dict(id=i + 1, file_name=name, height=img.shape[0], width=img.shape[1]))
            for k, poly in objs:
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=k + 1, iscrowd=0,
                                 bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                                 area=float(cv2.contourArea(poly.astype(np.float32))),
                                 segmentation=[poly.astype(float).ravel().tolist()]))
        ann_file = out / 'coco' / 'annotations' / f'instances_{split}.json'
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats,
                                            info=dict(description=f'OverLoCK demo shapes, seed {seed}'),
                                            licenses=[]), sort_keys=True))


def make_ade(out, seed, n_train, n_val):
    for s, (split, n) in enumerate((('training', n_train), ('validation', n_val))):
        rng = np.random.default_rng([seed, 3, s])
        for i in range(n):
            img, label, _ = _scene(rng)
            _save(img, out / 'ade' / 'images' / split / f'{split}_{i:04d}.jpg', quality=92)
            _save(label, out / 'ade' / 'annotations' / split / f'{split}_{i:04d}.png')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='demo_data', help='output root (default: demo_data)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--cls', type=int, nargs=2, default=(60, 20), metavar=('TRAIN', 'VAL'),
                   help='images per class (default: 60 20)')
    p.add_argument('--coco', type=int, nargs=2, default=(64, 16), metavar=('TRAIN', 'VAL'))
    p.add_argument('--ade', type=int, nargs=2, default=(64, 16), metavar=('TRAIN', 'VAL'))
    p.add_argument('--clean', action='store_true', help='delete OUT/{cls,coco,ade} first')
    args = p.parse_args(argv)
    out, t0 = Path(args.out), time.time()
    if args.clean:
        for sub in ('cls', 'coco', 'ade'):
            shutil.rmtree(out / sub, ignore_errors=True)
    make_cls(out, args.seed, *args.cls)
    make_coco(out, args.seed, *args.coco)
    make_ade(out, args.seed, *args.ade)
    (out / 'meta.json').write_text(json.dumps(dict(seed=args.seed, cls_classes=CLS_CLASSES,
                                                   shape_classes=SHAPE_CLASSES, seg_classes=SEG_CLASSES,
                                                   cls=args.cls, coco=args.coco,
                                                   ade=args.ade), indent=1))
    print(f'[make_demo_data] wrote {out}/{{cls,coco,ade}} (seed {args.seed}) in {time.time() - t0:.1f}s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
