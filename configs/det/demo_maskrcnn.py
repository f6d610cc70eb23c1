# CPU demo: Mask R-CNN + test_overlock (the tiny CI variant) on demo_data/coco (3 shape classes, 128x128 images,
# made by `python tools/make_demo_data.py --out demo_data`). Trains from scratch in a few minutes on 2 CPU cores:
#   python tools/train.py configs/det/demo_maskrcnn.py
#   python tools/test.py configs/det/demo_maskrcnn.py work_dirs/demo_maskrcnn/epoch_12.pth
# It is the real Mask R-CNN recipe scaled down: narrower FPN/heads (64 ch), smaller anchors for 20-50 px objects,
# fewer RPN/RoI samples and proposals, AdamW 1e-3, no SyncBN. Override the data with
#   --cfg-options data_root=... (the dataloaders and the evaluator read it).
_base_ = ['./overlock_t_maskrcnn_1x.py']

data_root = 'demo_data/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle'),
                palette=[(220, 20, 60), (0, 128, 0), (0, 0, 142)])
num_classes = 3
ch = 64

model = dict(
    backbone=dict(arch='test', drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[16, 32, 88, 120], out_channels=ch),
    rpn_head=dict(
        in_channels=ch, feat_channels=ch,
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=ch),
        bbox_head=dict(in_channels=ch, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=ch),
        mask_head=dict(in_channels=ch, conv_out_channels=ch, num_classes=num_classes)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

sync_bn = None  # CPU demo

img_scale = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True, min_size=8),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=8),
    checkpoint=dict(type='CheckpointHook', interval=4, max_keep_ckpts=2, save_best='auto'))
log_processor = dict(window_size=8)
auto_scale_lr = dict(enable=False, base_batch_size=4)
