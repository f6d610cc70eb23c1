# UperNet + OverLoCK-S, ADE20K 512x512, 160k iters, batch 16 = 8 GPUs x 2; AdamW 6e-5,
# drop path 0.3: the authors' recipe
_base_ = ['./overlock_t_upernet_160k_ade20k.py']

pretrained = 'pretrained/overlock_s_in1k_224.pth'
model = dict(
    backbone=dict(arch='s', drop_path_rate=0.3, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 448, 640]),
    auxiliary_head=dict(in_channels=448))
