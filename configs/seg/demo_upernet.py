# CPU demo: UperNet + test_overlock (the tiny CI variant) on demo_data/ade (ADE20K layout, 128x128; made by
# `python tools/make_demo_data.py --out demo_data`). 4 classes = make_demo_data.SEG_CLASSES: label 0 is background,
# a class that is trained and scored (reduce_zero_label=False, unlike ADE20K's ignored "other"), 1..3 the shapes.
#   python tools/train.py configs/seg/demo_upernet.py
#   python tools/test.py configs/seg/demo_upernet.py work_dirs/demo_upernet/iter_400.pth [--tta]
# The real UperNet recipe scaled down: narrow heads, BN instead of SyncBN, 128x128 crops, AdamW 2e-3, 400 iters.
# Same test-time AlignResize (keep ratio into 128x128, then up to a multiple of 32, bicubic) and the same TTA ratios.
_base_ = ['./overlock_t_upernet_160k_ade20k.py']

data_root = 'demo_data/ade'
# palette (RGB) = the colours tools/demo.py draws with
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200]])
num_classes = len(metainfo['classes'])  # 4
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=crop_size)

model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(arch='test', drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 88, 120], channels=64, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=88, channels=32, num_classes=num_classes, norm_cfg=norm_cfg))
sync_bn = None  # CPU demo

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='AlignResize', scale=crop_size, keep_ratio=True, size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='AlignResize', scale=(int(128 * r), int(128 * r)), keep_ratio=True, size_divisor=32)
             for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations', reduce_zero_label=False)],
            [dict(type='PackSegInputs')],
        ]),
]
demo_dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
               seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=4, num_workers=1, persistent_workers=True,
    dataset=dict(_delete_=True, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline, **demo_dataset))
val_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=True,
    dataset=dict(_delete_=True,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=test_pipeline, **demo_dataset))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=2e-3, weight_decay=0.01))
max_iters = 400
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=40),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=40, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=200)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=2, save_best='mIoU'))
auto_scale_lr = dict(enable=False, base_batch_size=4)
