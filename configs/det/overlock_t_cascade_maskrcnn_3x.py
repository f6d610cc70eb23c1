# Cascade Mask R-CNN + OverLoCK-T, 3x (36 epochs), multi-scale + AutoAugment crop, COCO 2017.
# The authors ship no Cascade config (overlock_facts.md C.2); this follows mmdet's ConvNeXt cascade 3x recipe,
# inherited from the installed mmdet config
#   convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py:
#   three 4conv1fc ConvFCBBoxHead stages with SyncBN (norm_cfg=dict(type='SyncBN')), GIoULoss (weight 10),
#   reg_decoded_bbox=True, the same train pipeline as our Mask R-CNN 3x, 36 epochs with steps at 27/33,
#   AdamW lr 2e-4 / wd 0.05 with a 1000-iteration linear warmup.
# Differences from that recipe: the OverLoCK backbone and its no-decay param groups instead of ConvNeXt's
# layer-wise lr decay (0.7), drop path T .2 / S .4 / B .6 as in our Mask R-CNN configs, fp32 by default
# (`tools/train.py --amp` = the recipe's AmpOptimWrapper).
# Batch 16 = 8 GPUs x 2:  bash tools/dist_train.sh configs/det/overlock_t_cascade_maskrcnn_3x.py 8
_base_ = ['mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

custom_imports = dict(imports=['overlock_core.mm', 'detection'], allow_failed_imports=False)

pretrained = 'pretrained/overlock_t_in1k_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='OverLoCKBackbone',
        arch='t',
        dense='det',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        lean='max',  # no hidden MLP map kept at detection sizes: less memory, ~5% slower, identical results
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 384, 640]))

sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='OverLoCKOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(official=False))

max_epochs = 36
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
train_dataloader = dict(batch_size=2, num_workers=2)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='auto'))
auto_scale_lr = dict(enable=False, base_batch_size=16)
