"""Test-time resize used by the OverLoCK authors for ADE20K, as an mmseg 1.x transform.

The official mmseg 0.x pipeline is ``Resize(img_scale=(2048, 512), keep_ratio=True)`` followed by
``ResizeToMultiple(size_divisor=32, interpolation='bicubic')``; their ``AlignResize`` does both in one transform.
:class:`AlignResize` is that transform for mmcv 2.x / mmseg 1.x:

1. keep-ratio rescale into ``scale`` (``(2048, 512)``: short side 512 unless the long side would exceed 2048),
   exactly as mmcv's ``Resize`` (image ``interpolation``, default bilinear; labels nearest);
2. resize *up* to the next multiple of ``size_divisor`` in each dimension -- image with ``align_interpolation``
   (bicubic), label maps nearest -- a resize, not padding;
3. ``img_shape`` and ``scale_factor`` (w, h) are recomputed from the final size, so mmseg's post-processing maps
   the prediction back to the original image correctly.

It also works as a train-time transform (``scale_factor=`` or ``scale=``), and ``keep_ratio=False`` is allowed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import mmcv
from mmcv.transforms import Resize
from mmseg.registry import TRANSFORMS

__all__ = ['AlignResize', 'align_size']


def align_size(h: int, w: int, size_divisor: int) -> Tuple[int, int]:
    """Smallest (h, w) >= the input with both sides multiples of ``size_divisor``."""
    return int(math.ceil(h / size_divisor)) * size_divisor, int(math.ceil(w / size_divisor)) * size_divisor


@TRANSFORMS.register_module()
class AlignResize(Resize):
    """Keep-ratio resize followed by a resize up to a multiple of ``size_divisor`` (see module docstring).

    Args:
        scale: target scale ``(w, h)`` (``(2048, 512)`` for ADE20K), or None with ``scale_factor``.
        scale_factor: rescale factor(s) instead of ``scale``.
        keep_ratio: keep the aspect ratio in step 1 (default True).
        size_divisor: the multiple for step 2 (default 32).
        interpolation: image interpolation of step 1 (mmcv ``Resize`` default ``'bilinear'``).
        align_interpolation: image interpolation of step 2 (``'bicubic'``, as the authors' ResizeToMultiple).
        backend: ``'cv2'`` or ``'pillow'``.

    Modified keys: ``img``, ``img_shape``, ``scale``, ``scale_factor``, ``keep_ratio``, ``gt_seg_map`` (and
    any map listed in ``seg_fields``).
    """

    def __init__(self, scale: Optional[Union[int, Tuple[int, int]]] = None,
                 scale_factor: Optional[Union[float, Tuple[float, float]]] = None, keep_ratio: bool = True,
                 size_divisor: int = 32, interpolation: str = 'bilinear', align_interpolation: str = 'bicubic',
                 backend: str = 'cv2', clip_object_border: bool = True):
        super().__init__(scale=scale, scale_factor=scale_factor, keep_ratio=keep_ratio,
                         clip_object_border=clip_object_border, backend=backend, interpolation=interpolation)
        if not isinstance(size_divisor, int) or size_divisor < 1:
            raise ValueError(f'size_divisor must be a positive int, got {size_divisor!r}')
        self.size_divisor = size_divisor
        self.align_interpolation = align_interpolation

    def _seg_keys(self, results: dict):
        keys = list(results.get('seg_fields', []))
        if 'gt_seg_map' not in keys:
            keys.append('gt_seg_map')
        return [k for k in keys if results.get(k, None) is not None]

    def transform(self, results: dict) -> dict:
        h0, w0 = results['img'].shape[:2]
        results = super().transform(results)  # step 1: mmcv Resize (img, seg nearest, scale_factor)
        h1, w1 = results['img'].shape[:2]
        h2, w2 = align_size(h1, w1, self.size_divisor)
        if (h2, w2) != (h1, w1):
            results['img'] = mmcv.imresize(results['img'], (w2, h2), interpolation=self.align_interpolation,
                                           backend=self.backend)
            for key in self._seg_keys(results):
                results[key] = mmcv.imresize(results[key], (w2, h2), interpolation='nearest', backend=self.backend)
        results['img_shape'] = (h2, w2)
        results['scale_factor'] = (w2 / w0, h2 / h0)
        return results

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f', size_divisor={self.size_divisor}, '
                f'align_interpolation={self.align_interpolation!r})')
