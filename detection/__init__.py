"""OverLoCK object detection / instance segmentation on mmdetection 3.x (Mask R-CNN, Cascade Mask R-CNN).

Everything detection needs is stock mmdet plus :mod:`overlock_core.mm` (backbone, optimizer constructor), reached
through the configs' ``custom_imports``; this package holds no registered modules today. Configs: ``configs/det/``;
usage: ``detection/README.md``.
"""
