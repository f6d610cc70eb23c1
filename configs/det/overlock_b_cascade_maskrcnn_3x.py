# Cascade Mask R-CNN + OverLoCK-B, 3x ms+crop; recipe as overlock_t_cascade_maskrcnn_3x.py, drop path 0.6
_base_ = ['./overlock_t_cascade_maskrcnn_3x.py']

pretrained = 'pretrained/overlock_b_in1k_224.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 528, 720]))
