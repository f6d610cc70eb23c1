#!/usr/bin/env python
"""Train an OverLoCK detector (mmdet 3.x) or segmentor (mmseg 1.x) with mmengine's Runner.

One script for both tasks: the config's ``default_scope`` (set by its ``mmdet::``/``mmseg::`` base) selects the
registries. Flags are the union of mmdet's and mmseg's ``tools/train.py``.

    python tools/train.py configs/det/demo_maskrcnn.py
    python tools/train.py configs/seg/overlock_t_upernet_160k_ade20k.py --amp --work-dir work_dirs/t_ade
    python tools/train.py CONFIG --resume                # latest checkpoint in the work dir
    python tools/train.py CONFIG --resume path/to/epoch_3.pth
    bash tools/dist_train.sh CONFIG 8                    # torchrun, --launcher pytorch (gloo on CPU)

SyncBN: ``sync_bn='torch'`` in the config (used when distributed on GPUs). Gradient checkpointing:
``--cfg-options model.backbone.with_cp=True``.

Before building the Runner it calls ``overlock_core.mm.install_runner_patches()`` (atomic checkpoint writes, the
``weights_only`` allow-list for mmengine checkpoints); a launcher of your own should do the same.
"""
import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a plain checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from overlock_core.mm import install_runner_patches  # noqa: E402
from overlock_core.mm.data import check_datasets, use_safe_image_loading  # noqa: E402
from overlock_core.mm.runner_utils import shutdown_distributed  # noqa: E402
from overlock_core.mm.runner_utils import (import_task, merge_cfg_options, prepare_work_dir,  # noqa: E402
                                           setup_distributed_env, task_of)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train an OverLoCK detector / segmentor (mmengine Runner)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models (default: work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='automatic mixed precision (AmpOptimWrapper, dynamic loss scale; needs a GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch size / auto_scale_lr.base_batch_size)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help="resume training: without a value from the latest checkpoint in the work dir, "
                             "or from the given checkpoint path")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (e.g. model.backbone.with_cp=True)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args) -> Config:
    cfg = Config.fromfile(args.config)  # imports custom_imports (overlock_core.mm, detection/segmentation)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        merge_cfg_options(cfg, args.cfg_options)
    task_of(cfg)
    import_task(cfg)
    use_safe_image_loading(cfg)
    prepare_work_dir(cfg, args.config, args.work_dir)

    if args.amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config (AmpOptimWrapper).')
        else:
            if wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
                raise SystemExit(f"--amp expects optim_wrapper.type 'OptimWrapper', got {wrapper.get('type')!r}")
            wrapper.type = 'AmpOptimWrapper'
            wrapper.loss_scale = 'dynamic'

    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if not scale or 'base_batch_size' not in scale:
            raise SystemExit('--auto-scale-lr needs `auto_scale_lr = dict(enable=False, base_batch_size=16)` '
                             'in the config')
        scale.enable = True

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not os.path.isfile(args.resume):
            raise SystemExit(f'--resume: checkpoint {args.resume} not found')
        cfg.resume = True
        cfg.load_from = args.resume

    hooks = list(cfg.get('custom_hooks', None) or [])
    if not any(h.get('type') == 'NonFiniteLossHook' for h in hooks):
        cfg.custom_hooks = hooks + [dict(type='NonFiniteLossHook')]  # stop at the first NaN/inf loss
    setup_distributed_env(cfg, args.launcher)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_datasets(cfg, ('train_dataloader', 'val_dataloader'))  # bad annotations/files: one line, before any work
    install_runner_patches()  # atomic checkpoint writes; --resume under torch's weights_only loading
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()
    shutdown_distributed()


if __name__ == '__main__':
    main()
