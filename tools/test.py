#!/usr/bin/env python
"""Evaluate an OverLoCK detector (mmdet 3.x) or segmentor (mmseg 1.x) checkpoint with mmengine's Runner.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--tta] [--out FILE_OR_DIR] [--show-dir DIR]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8 [--tta]

``--tta``: the config's ``tta_pipeline`` + ``tta_model`` (segmentation: multi-scale 0.5-1.75 + flip, logits
averaged by ``SegTTAModel``). ``--out``: detection -> a ``.pkl`` of raw predictions (mmdet ``DumpDetResults``);
segmentation -> a directory of predicted label PNGs. ``--show-dir``: drawn predictions.
Writes ``<work_dir>/results.json``: ``{"task": "det", "bbox_mAP": .., "segm_mAP": .., ...}`` or
``{"task": "seg", "mIoU": .., "aAcc": .., "mAcc": ..}``, all metrics in percent.
"""
import argparse
import os
import os.path as osp
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from overlock_core.mm import install_runner_patches  # noqa: E402
from overlock_core.mm.data import check_datasets  # noqa: E402
from overlock_core.mm.runner_utils import shutdown_distributed  # noqa: E402
from overlock_core.mm.runner_utils import (import_task, merge_cfg_options, prepare_work_dir,  # noqa: E402
                                           setup_distributed_env, summarise_metrics, task_of,
                                           write_results_json)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test an OverLoCK detector / segmentor (mmengine Runner)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='dir for logs and results.json (default: work_dirs/<config name>)')
    parser.add_argument('--out', help='det: .pkl file of predictions; seg: directory for predicted label maps')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='directory where drawn predictions are saved')
    parser.add_argument('--wait-time', type=float, default=2, help='interval of --show (s)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation (config tta_pipeline/tta_model)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _trigger_visualization(cfg: Config, args, task: str) -> None:
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise SystemExit('--show/--show-dir need default_hooks.visualization in the config')
    hook = hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        if task == 'det':
            hook['test_out_dir'] = osp.abspath(args.show_dir)
        else:
            hook['interval'] = 1
            cfg.visualizer['save_dir'] = args.show_dir


def build_cfg(args) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        merge_cfg_options(cfg, args.cfg_options)
    task = task_of(cfg)
    import_task(cfg)
    prepare_work_dir(cfg, args.config, args.work_dir)
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'checkpoint {args.checkpoint} not found')
    cfg.load_from = args.checkpoint
    cfg.resume = False

    if args.show or args.show_dir:
        _trigger_visualization(cfg, args, task)

    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise SystemExit('--tta needs `tta_model` and `tta_pipeline` in the config '
                             '(the segmentation configs define multi-scale + flip; mmdet has no mask TTA)')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = ConfigDict(cfg.tta_model)

    if args.out is not None:
        if task == 'det':
            if not args.out.endswith(('.pkl', '.pickle')):
                raise SystemExit('--out for detection must be a .pkl/.pickle file')
        else:
            cfg.test_evaluator['output_dir'] = args.out
            cfg.test_evaluator['keep_results'] = True

    setup_distributed_env(cfg, args.launcher)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_cfg(args)
    check_datasets(cfg, ('test_dataloader',))  # bad annotations or missing files: a one-line error before any work
    task = task_of(cfg)
    install_runner_patches()  # the checkpoint loads under torch's weights_only loading
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if args.out is not None and task == 'det':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    metrics = runner.test()
    if is_main_process():
        payload = summarise_metrics(task, metrics or {})
        payload.update(config=osp.abspath(args.config), checkpoint=osp.abspath(args.checkpoint), tta=bool(args.tta))
        path = osp.join(cfg.work_dir, 'results.json')
        write_results_json(path, payload)
        print(f'results written to {path}: ' + ', '.join(f'{k}={v}' for k, v in payload.items()
                                                          if isinstance(v, float)))
    shutdown_distributed()
    return metrics


if __name__ == '__main__':
    main()
