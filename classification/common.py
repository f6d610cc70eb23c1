"""Pieces shared by train.py and validate.py: distributed setup, precision, model building, evaluation.

Evaluation lives here so that validate.py computes accuracy with exactly the code that training logged.
"""
import contextlib
import datetime
import logging
import os
import sys

import timm
import torch
import torch.distributed as dist

import overlock_core  # noqa: F401  registers the OverLoCK timm entrypoints
from overlock_core.accel import accelerate, resolve
from overlock_core.checkpoint import CheckpointError, load_weights

log = logging.getLogger('cls')


def setup_logging(rank, work_dir=None):
    handlers = [logging.StreamHandler(sys.stdout)]
    if work_dir is not None and rank == 0:
        handlers.append(logging.FileHandler(os.path.join(work_dir, 'train.log')))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format='%(asctime)s %(message)s',
                        datefmt='%H:%M:%S', handlers=handlers, force=True)


def init_distributed():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them (or with 1 process) run plain, no process group.

    The timeout (env OVERLOCK_DIST_TIMEOUT, seconds, default 60) bounds how long a rank waits in a collective
    for a peer that died, so the survivors exit non-zero instead of hanging.
    """
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1:
        timeout = datetime.timedelta(seconds=float(os.environ.get('OVERLOCK_DIST_TIMEOUT', 60)))
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=timeout)
    return rank, world, device


def amp_dtype(cfg, device):
    """The training precision: 'auto' is the authors' fp16 autocast (with a GradScaler) on GPUs and fp32 on CPUs;
    a dtype named explicitly ('float16', 'bfloat16') is used on any device."""
    t = cfg['train']
    if not t['amp']:
        return None
    name = t['amp_dtype']
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else None
    if name not in ('bfloat16', 'float16'):
        raise SystemExit(f"train.amp_dtype must be auto, bfloat16 or float16, not '{name}'")
    return getattr(torch, name)


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def check_model_name(name):
    if not timm.is_model(name):
        known = ', '.join(timm.list_models('*overlock*'))
        raise SystemExit(f"unknown model '{name}' (model.name); OverLoCK variants: {known}")


def create_model(cfg, aux_head, device=None):
    """The configured timm model, with ``model.accel`` applied for ``device`` (``overlock_core.accel.resolve``)."""
    m = cfg['model']
    check_model_name(m['name'])
    kwargs = dict(m['kwargs'])
    if aux_head:
        kwargs['aux_head'] = True
    try:
        accel = resolve(m['accel'], device=device)
    except ValueError as e:
        raise SystemExit(f'model.accel: {e}')
    try:
        model = timm.create_model(m['name'], num_classes=cfg['data']['num_classes'],
                                  drop_path_rate=m['drop_path_rate'], **kwargs)
    except TypeError as e:  # an unknown constructor argument in model.kwargs
        raise SystemExit(f"cannot build {m['name']} with model.kwargs {m['kwargs']}: {e}")
    return accelerate(model, accel)


def load_model_weights(model, path, use_ema=False):
    """Load our checkpoints or the authors' files (any wrapping key, `module.` prefix; aux-head weights dropped when
    the model has none) through overlock_core; a mismatch (e.g. another variant) becomes a one-line SystemExit."""
    try:
        load_weights(model, path, strict=True, use_ema=use_ema)
    except CheckpointError as e:
        raise SystemExit(f'cannot load {path}: ' + ' '.join(str(e).split())[:500])


@torch.no_grad()
def evaluate(model, loader, device, dtype=None, world=1):
    """Top-1/top-5 (percent) and mean CE over the whole split. Counts of correct predictions (not per-batch
    percentages as timm.utils.accuracy gives) are summed over ranks, so the result is exact and rank-count free."""
    model.eval()
    k5 = min(5, len(loader.dataset.classes))
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, correct1, correct5, loss sum
    skipped = 0
    for images, target, skip in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, dtype):
            output = model(images)
        output = output.float()
        top = output.topk(k5, dim=1).indices.eq(target[:, None])
        loss = torch.nn.functional.cross_entropy(output, target, reduction='sum')
        stats += torch.stack([torch.tensor(float(len(target)), device=device), top[:, 0].sum(), top.any(1).sum(),
                              loss]).double()
        skipped += int(skip.sum())
    if world > 1:
        dist.all_reduce(stats)
    n = max(stats[0].item(), 1)
    return {'top1': 100 * stats[1].item() / n, 'top5': 100 * stats[2].item() / n, 'loss': stats[3].item() / n,
            'n': int(stats[0].item()), 'skipped': skipped}
