"""OverLoCK (CVPR 2025): one backbone for classification (timm), detection (mmdet) and segmentation (mmseg).

``import overlock_core`` registers the timm models; ``overlock_core.mm`` (imported by the OpenMMLab configs)
registers the mmengine backbone.
"""
from .models import ARCHS, OverLoCK, dense_channels, get_arch

__version__ = '0.1.0'
__all__ = ['ARCHS', 'OverLoCK', 'dense_channels', 'get_arch', '__version__']
