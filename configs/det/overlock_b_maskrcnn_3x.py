# Mask R-CNN + OverLoCK-B, 3x multi-scale + crop (36 epochs), batch 16 = 8 GPUs x 2; AdamW 1e-4, drop path 0.6
_base_ = ['./overlock_t_maskrcnn_3x.py']

pretrained = 'pretrained/overlock_b_in1k_224.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 528, 720]))
