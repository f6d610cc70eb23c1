"""OverLoCK semantic segmentation on mmsegmentation 1.x (UperNet).

Importing this package registers the segmentation-only pieces into mmseg's registries:
:class:`segmentation.transforms.AlignResize` (the authors' test-time resize). The backbone itself lives in
:mod:`overlock_core.mm`. Configs: ``configs/seg/``; usage: ``segmentation/README.md``.
"""
from .transforms import AlignResize

__all__ = ['AlignResize']
