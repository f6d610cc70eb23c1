"""Bad-data rules for the mmdet / mmseg runs (``tools/train.py``, ``tools/test.py``).

Before any work starts (``check_datasets``), each dataset of the run is checked and refused with a one-line error
naming the file when:

* its annotation file is missing, empty, not valid JSON, or lists no images (COCO-style ``ann_file``);
* an image the annotations list is missing (the count and the first few names are given);
* its image or label folder is missing or empty, or an image has no label map (ADE-style folders).

While training, a corrupt or truncated image that cannot be decoded is skipped with a counted warning naming the
file (``SafeLoadImageFromFile`` replaces ``LoadImageFromFile`` in the training pipeline; the dataset then draws
another sample). At test time an unreadable image stops the run with mmcv's message, which names the file:
skipping would change the metric. Grayscale and RGBA images are converted to 3-channel BGR by the loader
(``color_type='color'``).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import warnings
from typing import Any, Iterator, List

from mmcv.transforms import LoadImageFromFile
from mmcv.transforms.builder import TRANSFORMS

__all__ = ['check_datasets', 'use_safe_image_loading', 'SafeLoadImageFromFile']


def _datasets(ds: Any) -> Iterator[dict]:
    """Every dataset dict of a loader: wrappers (RepeatDataset, ConcatDataset, ...) and the datasets below them."""
    if not isinstance(ds, dict):
        return
    yield ds
    yield from _datasets(ds.get('dataset'))
    for d in ds.get('datasets') or []:
        yield from _datasets(d)


def _is_leaf(ds: dict) -> bool:
    """A dataset that reads files itself (not a wrapper)."""
    return not isinstance(ds.get('dataset'), dict) and not isinstance(ds.get('datasets'), (list, tuple))


def _join(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _refuse(msg: str) -> None:
    raise SystemExit(f'dataset error: {msg}')


def _first(names: List[str]) -> str:
    return ', '.join(names[:3]) + (' ...' if len(names) > 3 else '')


def _check_coco(ann: str, img_dir: str) -> None:
    if not osp.isfile(ann):
        _refuse(f'annotation file {ann} not found')
    if osp.getsize(ann) == 0:
        _refuse(f'annotation file {ann} is empty')
    try:
        with open(ann) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _refuse(f'annotation file {ann} is not valid JSON ({e})')
    images = data.get('images') if isinstance(data, dict) else None
    if not images:
        _refuse(f"annotation file {ann} lists no images (no 'images' entries)")
    missing = [im.get('file_name', '?') for im in images
               if not osp.isfile(osp.join(img_dir, str(im.get('file_name', ''))))]
    if missing:
        _refuse(f'{len(missing)} of {len(images)} images listed in {ann} are missing under {img_dir}: '
                f'{_first(missing)}')


def _check_folders(img_dir: str, seg_dir: str, img_suffix: str, seg_suffix: str) -> None:
    for kind, d in (('image', img_dir), ('label', seg_dir)):
        if not osp.isdir(d):
            _refuse(f'{kind} folder {d} not found')
    images: List[str] = []
    for root, _, files in os.walk(img_dir):
        images += [osp.relpath(osp.join(root, f), img_dir) for f in files if f.endswith(img_suffix)]
    if not images:
        _refuse(f'image folder {img_dir} has no *{img_suffix} images')
    missing = [im for im in sorted(images)
               if not osp.isfile(osp.join(seg_dir, im[:-len(img_suffix)] + seg_suffix))]
    if missing:
        _refuse(f'{len(missing)} of {len(images)} images in {img_dir} have no label map in {seg_dir}: '
                f'{_first(missing)}')


def _defaults(ds: dict, scope) -> dict:
    """Constructor defaults of the dataset class (file suffixes differ between mmseg datasets)."""
    import inspect
    from .runner_utils import config_class
    cls = config_class(ds, scope)
    if cls is None:
        return {}
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def check_datasets(cfg, loaders=('train_dataloader', 'val_dataloader', 'test_dataloader')) -> None:
    """Refuse, before any work starts, a dataset whose annotations or files are missing or unreadable."""
    for loader in loaders:
        if not cfg.get(loader):
            continue
        for ds in filter(_is_leaf, _datasets(cfg[loader].get('dataset'))):
            root = ds.get('data_root') or ''
            prefix = ds.get('data_prefix') or {}
            if ds.get('ann_file'):
                img_dir = _join(root, prefix.get('img', prefix.get('img_path', '')))
                _check_coco(_join(root, ds['ann_file']), img_dir)
            elif 'seg_map_path' in prefix:
                defaults = _defaults(ds, cfg.get('default_scope'))
                suffix = {k: ds.get(k, defaults.get(k)) for k in ('img_suffix', 'seg_map_suffix')}
                _check_folders(_join(root, prefix.get('img_path', '')), _join(root, prefix['seg_map_path']),
                               suffix['img_suffix'] or '.jpg', suffix['seg_map_suffix'] or '.png')


@TRANSFORMS.register_module(force=True)
class SafeLoadImageFromFile(LoadImageFromFile):
    """``LoadImageFromFile`` that turns an unreadable image into a skipped sample (returns None, so the training
    dataset draws another) and a warning that names the file and counts the skips so far."""
    skipped = 0

    def transform(self, results: dict):
        try:
            return super().transform(results)
        except Exception as e:  # missing, truncated or undecodable file
            SafeLoadImageFromFile.skipped += 1
            warnings.warn(f"skipping unreadable image {results.get('img_path')} ({type(e).__name__}: {e}); "
                          f'{SafeLoadImageFromFile.skipped} skipped so far')
            return None


def use_safe_image_loading(cfg) -> None:
    """Swap ``LoadImageFromFile`` for ``SafeLoadImageFromFile`` in the training pipeline(s)."""
    if not cfg.get('train_dataloader'):
        return
    for ds in _datasets(cfg.train_dataloader.get('dataset')):
        for step in ds.get('pipeline') or []:
            if isinstance(step, dict) and step.get('type') in ('LoadImageFromFile', 'mmcv.LoadImageFromFile'):
                step['type'] = 'SafeLoadImageFromFile'
