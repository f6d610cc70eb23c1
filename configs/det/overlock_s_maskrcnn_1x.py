# Mask R-CNN + OverLoCK-S, 1x (12 epochs), batch 16 = 8 GPUs x 2; AdamW 2e-4, drop path 0.4, the authors' recipe
_base_ = ['./overlock_t_maskrcnn_1x.py']

pretrained = 'pretrained/overlock_s_in1k_224.pth'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.4, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 448, 640]))
