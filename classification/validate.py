"""Evaluate a checkpoint with the paper's protocol: short side to floor(img_size / crop_pct) bicubic, centre crop.

    python classification/validate.py configs/cls/overlock_t.yaml overlock_t_in1k.pth [--reparam] [--use-ema]
    tools/dist_test.sh configs/cls/overlock_t.yaml CKPT 8

Reads our checkpoints and the authors' files alike (plain state dict or one wrapped in state_dict /
state_dict_ema / model, `module.` prefixes; aux-head weights are ignored because evaluation has no aux head).
Evaluates in fp32, as the authors' validate.py (``--amp``: in the training precision, ``train.amp_dtype``).
Reports top-1/top-5, images/s and peak memory (GPU allocator peak on CUDA, process peak RSS on CPU) and writes
results.json. Accuracy comes from the same `evaluate()` that training logs, so the numbers match exactly.
"""
import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timm.utils import reparameterize_model

from classification.common import (amp_dtype, check_model_name, create_model, evaluate, init_distributed,
                                   load_model_weights, log, setup_logging)
from classification.config import load_config
from classification.data import build_eval_loader


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--work-dir', help='where results.json goes; default work_dirs/<config name>/eval')
    p.add_argument('--split', help='data split folder (default: data.val_split)')
    p.add_argument('--batch-size', type=int, default=None, help='per process (default: train.batch_size_per_gpu)')
    p.add_argument('--crop-pct', type=float, default=None, help='default: data.crop_pct, else the model default')
    p.add_argument('--reparam', action='store_true', help='switch to the deploy (re-parameterised) form first')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    p.add_argument('--amp', action='store_true',
                   help='evaluate under autocast in the training precision (train.amp_dtype); default fp32')
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    check_model_name(cfg['model']['name'])
    root = os.path.join(cfg['data']['data_dir'], args.split or cfg['data']['val_split'])
    if not os.path.isdir(root):
        raise SystemExit(f'dataset directory not found: {root} (set data.data_dir)')
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f'checkpoint not found: {args.checkpoint}')
    work_dir = args.work_dir or os.path.join('work_dirs', Path(args.config).stem, 'eval')
    rank, world, device = init_distributed()
    try:
        return run(cfg, args, root, work_dir, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, args, root, work_dir, rank, world, device):
    setup_logging(rank)
    torch.backends.cudnn.benchmark = bool(cfg['train']['cudnn_benchmark'])  # as training (timm's validate.py too)
    model = create_model(cfg, aux_head=False, device=device)  # the aux head only exists to shape training
    load_model_weights(model, args.checkpoint, use_ema=args.use_ema)
    if args.reparam:
        model = reparameterize_model(model)
    model = model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    crop_pct = args.crop_pct or cfg['data']['crop_pct'] or model.pretrained_cfg.get('crop_pct', 0.875)
    loader = build_eval_loader(cfg, root, crop_pct, args.batch_size or cfg['train']['batch_size_per_gpu'], rank, world)
    dtype = amp_dtype(cfg, device) if args.amp else None
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    res = evaluate(model, loader, device, dtype, world)
    elapsed = time.time() - t0
    if device.type == 'cuda':
        peak_mb, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, 'gpu_allocated'
    else:
        peak_mb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'process_rss'
    out = {'task': 'cls', 'model': cfg['model']['name'], 'checkpoint': os.path.abspath(args.checkpoint),
           'top1': res['top1'], 'top5': res['top5'], 'loss': res['loss'], 'images': res['n'],
           'params': n_params, 'reparam': args.reparam, 'ema': args.use_ema,
           'figure': f"checkpoint evaluation ({'EMA' if args.use_ema else 'model'} weights)",
           'precision': str(dtype or torch.float32).replace('torch.', ''), 'crop_pct': crop_pct,
           'img_size': cfg['data']['img_size'], 'images_per_s': res['n'] / elapsed, 'peak_mem_mb': peak_mb,
           'peak_mem_kind': peak_kind, 'world_size': world, 'skipped_images': res['skipped']}
    if rank == 0:
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, 'results.json'), 'w') as f:
            json.dump(out, f, indent=2)
        log.info(f"{cfg['model']['name']} {args.checkpoint}: top1 {res['top1']:.3f} top5 {res['top5']:.3f} "
                 f"({res['n']} images, {out['images_per_s']:.1f} img/s, peak {peak_kind} {peak_mb:.0f} MiB, "
                 f"{n_params / 1e6:.2f}M params{', reparam' if args.reparam else ''}) -> {work_dir}/results.json")
    return out


if __name__ == '__main__':
    main()
