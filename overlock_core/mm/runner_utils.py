"""Helpers shared by ``tools/train.py`` and ``tools/test.py`` (one launcher pair for mmdet and mmseg).

The task is chosen by the config's ``default_scope`` (``'mmdet'`` / ``'mmseg'``, set by the inherited bases);
mmengine's Runner then resolves every registry through that scope, so nothing else here is task-specific.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
import warnings
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config

__all__ = ['task_of', 'apply_data_root', 'config_class', 'merge_cfg_options', 'prepare_work_dir',
           'setup_distributed_env', 'import_task', 'summarise_metrics', 'write_results_json']

_TASKS = {'mmdet': 'det', 'mmseg': 'seg'}


def task_of(cfg: Config) -> str:
    """``'det'`` or ``'seg'`` from ``cfg.default_scope``; a clear error otherwise."""
    scope = cfg.get('default_scope')
    if scope not in _TASKS:
        raise SystemExit(f"config default_scope is {scope!r}; expected 'mmdet' or 'mmseg' (inherit a base config "
                         "like 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py' or "
                         "'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py')")
    return _TASKS[scope]


def import_task(cfg: Config) -> None:
    """Import the toolbox of the config's scope (registers its modules) and our adapter."""
    import overlock_core.mm  # noqa: F401  registers the backbone and the optimizer constructor
    if task_of(cfg) == 'det':
        import mmdet  # noqa: F401
        try:
            from mmdet.utils import setup_cache_size_limit_of_dynamo
            setup_cache_size_limit_of_dynamo()
        except ImportError:  # pragma: no cover
            pass
    else:
        import mmseg  # noqa: F401


def apply_data_root(cfg: Config, old_root: Optional[str], new_root: str) -> None:
    """Propagate a ``--cfg-options data_root=...`` override into the dataloaders and evaluators.

    Text configs resolve ``data_root`` when they are parsed, so changing the top-level key alone changes nothing.
    """
    cfg.data_root = new_root
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        ds = cfg.get(loader, {}).get('dataset') if cfg.get(loader) else None
        while ds is not None:
            if 'data_root' in ds:
                ds['data_root'] = new_root
            ds = ds.get('dataset')
    for ev_key in ('val_evaluator', 'test_evaluator'):
        evs = cfg.get(ev_key)
        for ev in (evs if isinstance(evs, list) else [evs]):
            if isinstance(ev, dict) and isinstance(ev.get('ann_file'), str) and old_root \
                    and ev['ann_file'].startswith(old_root):
                ev['ann_file'] = osp.join(new_root, ev['ann_file'][len(old_root):].lstrip('/'))


def config_class(node: dict, scope: Optional[str]):
    """The class a config dict's ``type`` names, looked up in the task's registries (None if not found)."""
    import importlib
    from mmengine.registry import Registry
    kind = node.get('type')
    if not isinstance(kind, str):
        return kind if isinstance(kind, type) else None
    try:
        registries = vars(importlib.import_module(f'{scope}.registry')).values() if scope else []
    except ImportError:  # pragma: no cover
        registries = []
    for reg in registries:
        if isinstance(reg, Registry):
            found = reg.get(kind)
            if found is not None:
                return found
    return None


def _accepts(node: dict, name: str, scope: Optional[str]) -> bool:
    """Whether ``name`` may be added to a config dict: it must be an argument of the class the dict builds."""
    import inspect
    if 'type' not in node:
        return False
    cls = config_class(node, scope)
    if cls is None:
        return True  # cannot tell; the constructor will check when it is built
    params = inspect.signature(cls.__init__ if inspect.isclass(cls) else cls).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def merge_cfg_options(cfg: Config, options: Dict[str, Any]) -> None:
    """Apply ``--cfg-options``, refusing a key the config does not have (a typo would otherwise be silently added
    and ignored). New keys are allowed where they are constructor arguments: inside a dict with a ``type`` whose
    class takes that argument, or top-level arguments of mmengine's Runner."""
    import inspect
    from mmengine.runner import Runner
    runner_args = set(inspect.signature(Runner.__init__).parameters)
    scope = cfg.get('default_scope')
    for key in options:
        node: Any = cfg._cfg_dict  # the ConfigDict behind the Config
        parts = key.split('.')
        for depth, part in enumerate(parts):
            where = '.'.join(parts[:depth]) or 'the config'
            if isinstance(node, (list, tuple)):
                if not (part.isdigit() and int(part) < len(node)):
                    raise SystemExit(f'--cfg-options {key}: {where} is a list of {len(node)}, no index {part!r}')
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise SystemExit(f'--cfg-options {key}: {where} is a {type(node).__name__}, not a dict')
            if part not in node:
                allowed = part in runner_args if depth == 0 else _accepts(node, part, scope)
                if not allowed:
                    known = ', '.join(sorted(str(k) for k in node)[:12])
                    raise SystemExit(f'--cfg-options {key}: unknown key {part!r} in {where} (has: {known})')
                break  # a new argument: nothing below it to check
            node = node[part]
    old_root = cfg.get('data_root')
    cfg.merge_from_dict(options)
    if 'data_root' in options:
        apply_data_root(cfg, old_root, options['data_root'])


def prepare_work_dir(cfg: Config, config_path: str, work_dir: Optional[str]) -> None:
    """``--work-dir`` > ``cfg.work_dir`` > ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def setup_distributed_env(cfg: Config, launcher: str) -> None:
    """Make ``--launcher pytorch`` work on CPU-only machines (gloo) as well as on GPUs (nccl).

    On CPU: initialise the gloo process group here (mmengine's ``init_dist`` would call
    ``torch.cuda.set_device``), use :class:`overlock_core.mm.dist.CPUDistributedDataParallel` (no ``device_ids``),
    and drop ``sync_bn`` (torch's SyncBatchNorm has no CPU kernel).
    """
    if launcher == 'none' or torch.cuda.is_available():
        return
    import torch.distributed as dist
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    if launcher != 'pytorch':
        raise SystemExit(f'--launcher {launcher} on a machine without CUDA is not supported; use pytorch (torchrun)')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel')
    if cfg.get('sync_bn') is not None:
        warnings.warn('sync_bn is ignored on CPU (torch SyncBatchNorm needs CUDA); plain BN per process')
        cfg.sync_bn = None


def _pct(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def summarise_metrics(task: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Flatten mmengine metric names and convert them to percentages (0-100) as the contract asks.

    mmdet's CocoMetric reports fractions (``coco/bbox_mAP`` = 0.423); mmseg's IoUMetric already reports percents.
    """
    out: Dict[str, Any] = {'task': task}
    for key, val in metrics.items():
        name = key.split('/')[-1]
        if not isinstance(val, (int, float)):
            continue
        if task == 'det':
            out[name] = _pct(100.0 * val) if val >= 0 else _pct(val)  # -1 = no such objects
        else:
            out[name] = _pct(val)
    return out


def write_results_json(path: str, payload: Dict[str, Any]) -> None:
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write('\n')
    os.replace(tmp, path)


def shutdown_distributed() -> None:
    """Destroy the process group before exit: gloo's worker threads left to interpreter teardown can abort a rank
    ("terminate called without an active exception") after a run that otherwise succeeded."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
