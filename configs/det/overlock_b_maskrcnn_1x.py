# Mask R-CNN + OverLoCK-B, 1x (12 epochs), batch 16 = 8 GPUs x 2; AdamW 2e-4, drop path 0.6, the authors' recipe
_base_ = ['./overlock_t_maskrcnn_1x.py']

pretrained = 'pretrained/overlock_b_in1k_224.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 528, 720]))
