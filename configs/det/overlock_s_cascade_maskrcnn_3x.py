# Cascade Mask R-CNN + OverLoCK-S, 3x ms+crop; recipe as overlock_t_cascade_maskrcnn_3x.py, drop path 0.4
_base_ = ['./overlock_t_cascade_maskrcnn_3x.py']

pretrained = 'pretrained/overlock_s_in1k_224.pth'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.4, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 448, 640]))
