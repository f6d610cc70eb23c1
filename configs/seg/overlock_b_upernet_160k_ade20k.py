# UperNet + OverLoCK-B, ADE20K 512x512, 160k iters, batch 16 = 8 GPUs x 2; AdamW 6e-5,
# drop path 0.5: the authors' recipe
_base_ = ['./overlock_t_upernet_160k_ade20k.py']

pretrained = 'pretrained/overlock_b_in1k_224.pth'
model = dict(
    backbone=dict(arch='b', drop_path_rate=0.5, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[80, 160, 528, 720]),
    auxiliary_head=dict(in_channels=528))
