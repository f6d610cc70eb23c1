# UperNet + OverLoCK-T, ADE20K, 512x512 crops, 160k iterations -- the authors' recipe
# on mmseg 1.2.2. Inherited from the installed mmseg config: UPerHead (512 ch, pool scales 1/2/3/6, dropout 0.1,
# SyncBN), auxiliary FCNHead on the stride-16 map (in_index=2, 256 ch, 1 conv, loss weight 0.4), 150 classes,
# the train pipeline (random rescale of 2048x512 by 0.5-2.0, 512x512 crop with cat_max_ratio 0.75, flip,
# photometric distortion), whole-image inference, IoUMetric.
# Batch 16 = 8 GPUs x 2 images:  bash tools/dist_train.sh configs/seg/overlock_t_upernet_160k_ade20k.py 8
# Test: single scale  tools/test.py CONFIG CKPT ; multi-scale + flip  tools/test.py CONFIG CKPT --tta
_base_ = ['mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py']

custom_imports = dict(imports=['overlock_core.mm', 'segmentation'], allow_failed_imports=False)

pretrained = 'pretrained/overlock_t_in1k_224.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='OverLoCKBackbone',
        arch='t',
        dense='seg',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        accel='auto',  # faster module forms (overlock_core.accel): on CPUs lean='max'; 'off' for the paper form
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 384, 640], num_classes=150),
    auxiliary_head=dict(in_channels=384, in_index=2, num_classes=150))

sync_bn = 'torch'

# AdamW 6e-5, wd 0.01, no grad clip; the authors' decay groups (official=True: only 'norm'-named LayerNorms
# undecayed). official=False: the extended no-decay policy of overlock_core.mm.optim (a deviation).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='OverLoCKOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(official=True),
    clip_grad=None)

max_iters = 160000
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=8000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=8000, max_keep_ckpts=3, save_best='mIoU'))

# Test-time resize of the authors: keep ratio into 2048x512, then *resize* up to the next multiple of 32 (bicubic).
# Labels are loaded after the resize: metrics are computed at the original resolution.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='AlignResize', scale=(2048, 512), keep_ratio=True, size_divisor=32, align_interpolation='bicubic'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# Multi-scale + flip (`--tta`): ratios 0.5 ... 1.75 of 2048x512, each aligned to 32, logits averaged by SegTTAModel.
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='AlignResize', scale=(int(2048 * r), int(512 * r)), keep_ratio=True, size_divisor=32)
             for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations', reduce_zero_label=True)],
            [dict(type='PackSegInputs')],
        ]),
]
tta_model = dict(type='SegTTAModel')

train_dataloader = dict(batch_size=2, num_workers=4)  # per GPU
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
