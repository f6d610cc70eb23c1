# Mask R-CNN + OverLoCK-T, 1x schedule (12 epochs), COCO 2017 -- the authors' recipe
# on mmdet 3.3.0. Everything not stated here comes from the installed mmdet's config (RPN/RoI heads, assigners,
# samplers, RoIAlign 7/14, 1000 proposals, score_thr 0.05, 100 dets, mask thr 0.5, 1333x800 train/test resize,
# flip 0.5, CocoMetric bbox+segm).
# Batch 16 = 8 GPUs x 2 images:  bash tools/dist_train.sh configs/det/overlock_t_maskrcnn_1x.py 8
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['overlock_core.mm'], allow_failed_imports=False)

# ImageNet-1K checkpoint (ours from classification/train.py, or the authors' overlock_t_in1k_224.pth)
pretrained = 'pretrained/overlock_t_in1k_224.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='OverLoCKBackbone',
        arch='t',
        dense='det',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,  # BN layers are trained (no frozen stages, no norm_eval), as the authors do
        norm_eval=False,
        with_cp=False,  # True: gradient checkpointing (less memory, ~25% slower)
        accel='auto',  # faster module forms (overlock_core.accel): on CPUs lean='max'; 'off' for the paper form
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 384, 640]))

# BN -> SyncBN when launched distributed (the Runner converts; single-process runs keep BN)
sync_bn = 'torch'

# AdamW 2e-4, wd 0.05, the authors' decay groups (official=True: only 'norm'-named LayerNorms undecayed; BN, rpb,
# layer scales and GRN decayed). official=False is the extended no-decay policy of overlock_core.mm.optim (biases,
# norms, layer scales, GRN, rpb), a deviation. fp32, as the authors; `tools/train.py --amp`: AmpOptimWrapper.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='OverLoCKOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(official=True))

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

train_dataloader = dict(batch_size=2, num_workers=2)  # per GPU
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='auto'))
auto_scale_lr = dict(enable=False, base_batch_size=16)
