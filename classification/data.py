"""ImageFolder data with timm transforms, tolerant of unreadable files, and exact distributed evaluation.

Unreadable-image rule: if a file cannot be decoded (corrupt or truncated), `SafeImageFolder` warns once per file
(naming it) and returns the next readable sample in index order instead, flagged as a skip. The batch size
therefore never changes (mixup needs even batches, DDP needs equal ones), and the caller sums the flags to
report how many reads were replaced. More than `max_retries` unreadable files in a row is an error.
Grayscale, palette and RGBA images are converted to RGB (alpha dropped).
"""
import math
import os
import warnings

import torch
from PIL import Image, ImageFile
from timm.data import create_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail to load, not come back half grey


class SafeImageFolder(ImageFolder):
    """ImageFolder whose samples are (image, target, skipped) with unreadable files replaced (see module doc)."""
    max_retries = 10

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=self._load_rgb)
        self._warned = set()

    @staticmethod
    def _load_rgb(path):
        with open(path, 'rb') as f:
            img = Image.open(f)
            img.load()
            return img.convert('RGB')

    def __getitem__(self, index):
        for attempt in range(self.max_retries + 1):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f'skipping unreadable image {path}: {type(e).__name__}: {e}', RuntimeWarning)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target, int(attempt > 0)
        raise RuntimeError(f'{self.max_retries + 1} unreadable images in a row starting at {self.samples[index][0]}')


class ShardSampler(Sampler):
    """Rank r takes indices r, r + world, ...: no padding, so summed counts give the exact accuracy."""

    def __init__(self, n, rank, world):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededRandomSampler(Sampler):
    """Single-process shuffling that depends only on (seed, epoch), like DistributedSampler, so resume is exact."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def check_data_dir(cfg):
    """Fail before any work if a split directory is missing."""
    for split in (cfg['data']['train_split'], cfg['data']['val_split']):
        path = os.path.join(cfg['data']['data_dir'], split)
        if not os.path.isdir(path):
            raise SystemExit(f'dataset directory not found: {path} (set data.data_dir)')


def eval_transform(cfg, crop_pct):
    d = cfg['data']
    return create_transform(d['img_size'], is_training=False, interpolation=d['interpolation'], crop_pct=crop_pct,
                            crop_mode='center', mean=tuple(d['mean']), std=tuple(d['std']))


def train_transform(cfg):
    d, a = cfg['data'], cfg['aug']
    return create_transform(
        d['img_size'], is_training=True, scale=tuple(a['scale']), ratio=tuple(a['ratio']), hflip=a['hflip'],
        color_jitter=a['color_jitter'], auto_augment=a['auto_augment'], interpolation=a['interpolation'],
        re_prob=a['reprob'], re_mode=a['remode'], re_count=a['recount'], mean=tuple(d['mean']), std=tuple(d['std']))


def build_eval_loader(cfg, root, crop_pct, batch_size, rank=0, world=1):
    ds = SafeImageFolder(root, transform=eval_transform(cfg, crop_pct))
    pin = cfg['data']['pin_memory'] and torch.cuda.is_available()
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world),
                      num_workers=cfg['data']['workers'], pin_memory=pin)


def build_train_loader(cfg, rank=0, world=1):
    root = os.path.join(cfg['data']['data_dir'], cfg['data']['train_split'])
    ds = SafeImageFolder(root, transform=train_transform(cfg))
    seed = cfg['train']['seed']
    if world > 1:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        sampler = SeededRandomSampler(len(ds), seed)
    bs = cfg['train']['batch_size_per_gpu']
    if len(sampler) < bs:
        raise SystemExit(f'training set too small: {len(sampler)} images per process < batch_size_per_gpu {bs}')
    # NOTE: no persistent workers: the per-epoch reseed in train.py must reach the workers' augmentation RNGs
    return DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True, num_workers=cfg['data']['workers'],
                      pin_memory=cfg['data']['pin_memory'] and torch.cuda.is_available())


def num_batches(loader):
    return math.floor(len(loader.sampler) / loader.batch_size)
