"""Train an OverLoCK classifier on an ImageFolder dataset with the authors' ImageNet-1K recipe (the config defaults).

    torchrun --nproc_per_node 8 classification/train.py configs/cls/overlock_t.yaml   # or tools/dist_train.sh CFG 8
    python classification/train.py configs/cls/demo.yaml --cfg-options train.epochs=3 # one process, no dist

The loop is deliberately small and built from timm parts (transforms, Mixup, optimizer/scheduler factories,
ModelEmaV3); what it adds is what the stock timm train.py lacks for OverLoCK: the deep-supervision loss on the
aux head, gradient accumulation to reach the recipe's global batch on fewer GPUs, exact resume (RNGs are reseeded
from (seed, epoch, rank) at every epoch start, so a run resumed from `checkpoint-last.pth` retraces the
uninterrupted one), and a hard stop on a non-finite loss before any NaN weights can be written.
Test hook: env OVERLOCK_FAULT_NAN_STEP=N makes the loss NaN at optimizer step N (to exercise the stop/skip path).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, distribute_bn
from torch.nn.parallel import DistributedDataParallel

from classification.common import (amp_dtype, autocast, check_model_name, create_model, evaluate, init_distributed,
                                   load_model_weights, log, setup_logging)
from classification.config import load_config, save_config
from classification.data import build_eval_loader, build_train_loader, check_data_dir, num_batches
from overlock_core.accel import form_name
from overlock_core.checkpoint import save_atomic
from overlock_core.losses import DeepSupervisionLoss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('config', help='YAML config, e.g. configs/cls/overlock_t.yaml')
    p.add_argument('--work-dir', help='default: work_dirs/<config name>')
    p.add_argument('--resume', help="'auto' = <work-dir>/checkpoint-last.pth if present, else a checkpoint path")
    p.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='override config keys, e.g. model.drop_path_rate=0.2 train.epochs=10')
    return p.parse_args(argv)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    state = {'python': random.getstate(), 'numpy': np.random.get_state()[1].tolist(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def build_criterion(cfg):
    """Soft-target CE with mixup (smoothing is folded into the mixed targets), else smoothed CE; wrapped so that a
    (main, aux) tuple from a model with an aux head costs main + aux_weight * aux."""
    a = cfg['aug']
    if a['mixup'] > 0 or a['cutmix'] > 0:
        base = SoftTargetCrossEntropy()
    elif a['smoothing'] > 0:
        base = LabelSmoothingCrossEntropy(smoothing=a['smoothing'])
    else:
        base = torch.nn.CrossEntropyLoss()
    return DeepSupervisionLoss(base, aux_weight=cfg['model']['aux_weight'])


DECAY_GROUPS = ('authors', 'extended')


def decay_groups(model, t):
    """What the optimizer decays. 'authors': timm's rule (1-d tensors and biases exempt; OverLoCK's
    ``no_weight_decay()`` adds nothing), as the authors trained. 'extended' (opt-in deviation): layer scales, GRN
    gamma/beta and the rpb tables are exempt too."""
    if t['decay_groups'] != 'extended':  # main() has checked the name
        return model  # create_optimizer_v2 builds timm's groups
    from overlock_core.models import extended_no_weight_decay
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    skip |= extended_no_weight_decay(model)
    return param_groups_weight_decay(model, t['weight_decay'], no_weight_decay_list=skip)


def batch_plan(cfg, world):
    """(global batch, accumulation steps, lr). The lr rule follows the global batch, not what fits per step."""
    t = cfg['train']
    per_step = t['batch_size_per_gpu'] * world
    total = t['batch_size'] or per_step
    if (cfg['aug']['mixup'] > 0 or cfg['aug']['cutmix'] > 0) and t['batch_size_per_gpu'] % 2:
        raise SystemExit(f"train.batch_size_per_gpu must be even with mixup/cutmix, got {t['batch_size_per_gpu']}")
    if total % per_step:
        raise SystemExit(f"train.batch_size {total} is not a multiple of batch_size_per_gpu x processes = {per_step}")
    lr = t['lr'] or t['lr_base'] * total / t['lr_base_size']
    return total, total // per_step, lr


def state_hash(module):
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NonFiniteLoss(Exception):
    pass


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    work_dir = args.work_dir or os.path.join('work_dirs', Path(args.config).stem)
    # everything that can be checked cheaply fails here, before a process group or a model exists
    check_model_name(cfg['model']['name'])
    if cfg['train']['decay_groups'] not in DECAY_GROUPS:
        raise SystemExit(f"train.decay_groups must be one of {', '.join(DECAY_GROUPS)}, "
                         f"not '{cfg['train']['decay_groups']}'")
    check_data_dir(cfg)
    batch_plan(cfg, int(os.environ.get('WORLD_SIZE', 1)))
    resume = args.resume
    if resume == 'auto':
        resume = os.path.join(work_dir, 'checkpoint-last.pth')
        resume = resume if os.path.isfile(resume) else None
    for path in (resume, cfg['model']['pretrained']):
        if path and not os.path.isfile(path):
            raise SystemExit(f'checkpoint not found: {path}')
    rank, world, device = init_distributed()
    try:
        return Trainer(cfg, work_dir, rank, world, device).fit(resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg, work_dir, rank, world, device):
        self.cfg, self.work_dir, self.rank, self.world, self.device = cfg, work_dir, rank, world, device
        t = cfg['train']
        os.makedirs(work_dir, exist_ok=True)
        setup_logging(rank, work_dir)
        self.total_batch, self.accum, lr = batch_plan(cfg, world)
        self.dtype = amp_dtype(cfg, device)
        seed_all(t['seed'])  # identical init on every rank (DDP also broadcasts it)
        torch.backends.cudnn.benchmark = bool(t['cudnn_benchmark'])

        model = create_model(cfg, aux_head=cfg['model']['aux_head'], device=device)
        if cfg['model']['pretrained']:
            load_model_weights(model, cfg['model']['pretrained'])
        if t['grad_checkpointing']:
            model.set_grad_checkpointing(True)
        if world > 1 and t['sync_bn'] and device.type == 'cuda':
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        self.form = form_name(model)
        self.ema = ModelEmaV3(self.model, decay=t['ema_decay']) if t['ema'] else None
        self.optimizer = create_optimizer_v2(decay_groups(self.model, t), t['opt'], lr=lr,
                                             weight_decay=t['weight_decay'], eps=t['opt_eps'],
                                             betas=tuple(t['opt_betas']))
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

        self.loader = build_train_loader(cfg, rank, world)
        val_root = os.path.join(cfg['data']['data_dir'], cfg['data']['val_split'])
        crop_pct = cfg['data']['crop_pct'] or model.pretrained_cfg.get('crop_pct', 0.875)
        self.val_loader = build_eval_loader(cfg, val_root, crop_pct, t['batch_size_per_gpu'], rank, world)
        if self.loader.dataset.classes != self.val_loader.dataset.classes:
            raise SystemExit('train and val splits have different class folders')
        self.steps_per_epoch = max(1, num_batches(self.loader) // self.accum)
        if t['steps_per_epoch']:
            self.steps_per_epoch = min(self.steps_per_epoch, t['steps_per_epoch'])
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, t['sched'], num_epochs=t['epochs'], warmup_epochs=t['warmup_epochs'],
            cooldown_epochs=t['cooldown_epochs'], min_lr=t['min_lr'], warmup_lr=t['warmup_lr'],
            updates_per_epoch=self.steps_per_epoch)
        a = cfg['aug']
        self.mixup = Mixup(mixup_alpha=a['mixup'], cutmix_alpha=a['cutmix'], prob=a['mixup_prob'],
                           switch_prob=a['mixup_switch_prob'], mode=a['mixup_mode'], label_smoothing=a['smoothing'],
                           num_classes=cfg['data']['num_classes']) if a['mixup'] > 0 or a['cutmix'] > 0 else None
        self.criterion = build_criterion(cfg)
        self.epoch, self.step, self.skipped_steps = 0, 0, 0
        self.best = {'top1': -1.0, 'epoch': -1, 'ema_top1': -1.0, 'ema_epoch': -1}
        self.n_params = sum(p.numel() for p in model.parameters())
        self.resumed_metrics = {}

    # ---------------------------------------------------------------- checkpoints
    def state(self, metrics):
        s = {'arch': self.cfg['model']['name'], 'state_dict': self.model.state_dict(),
             'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
             'epoch': self.epoch, 'step': self.step, 'skipped_steps': self.skipped_steps, 'best': self.best,
             'metrics': metrics, 'rng': rng_state(), 'config': self.cfg}
        if self.ema is not None:
            s['state_dict_ema'] = self.ema.module.state_dict()
        if self.scaler is not None:
            s['scaler'] = self.scaler.state_dict()
        return s

    def load(self, path):
        try:
            ck = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise SystemExit(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}')
        if ck.get('arch') != self.cfg['model']['name']:
            raise SystemExit(f"checkpoint {path} is for model '{ck.get('arch')}', config has "
                             f"'{self.cfg['model']['name']}'")
        try:
            self.model.load_state_dict(ck['state_dict'])
            if self.ema is not None:
                self.ema.module.load_state_dict(ck['state_dict_ema'])
        except (RuntimeError, KeyError) as e:
            raise SystemExit(f'checkpoint {path} does not fit the model: ' + ' '.join(str(e).split())[:300])
        self.optimizer.load_state_dict(ck['optimizer'])
        self.scheduler.load_state_dict(ck['scheduler'])
        if self.scaler is not None and 'scaler' in ck:
            self.scaler.load_state_dict(ck['scaler'])
        self.epoch, self.step, self.skipped_steps = ck['epoch'] + 1, ck['step'], ck['skipped_steps']
        self.best = ck['best']
        self.resumed_metrics = ck['metrics']
        rng = ck['rng']
        random.setstate(rng['python'])
        np.random.set_state(('MT19937', np.array(rng['numpy'], dtype=np.uint32), 624, 0, 0.0))
        torch.set_rng_state(rng['torch'])
        if 'cuda' in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng['cuda'])
        log.info(f'resumed from {path}: next epoch {self.epoch}, step {self.step}')

    def save(self, metrics):
        s = self.state(metrics)
        save_atomic(s, os.path.join(self.work_dir, 'checkpoint-last.pth'))
        if self.best['epoch'] == self.epoch:
            save_atomic(s, os.path.join(self.work_dir, 'checkpoint-best.pth'))
        if self.best['ema_epoch'] == self.epoch:
            save_atomic(s, os.path.join(self.work_dir, 'checkpoint-best-ema.pth'))

    # ---------------------------------------------------------------- training
    def fit(self, resume=None):
        cfg, t = self.cfg, self.cfg['train']
        if resume:
            self.load(resume)
        if self.rank == 0:
            save_config(cfg, os.path.join(self.work_dir, 'config.yaml'))
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.work_dir, 'tb'))
        ids = [self.device] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(self.model, device_ids=ids) if self.world > 1 else self.model
        if t['compile']:  # true = inductor, or a backend name (e.g. aot_eager to debug)
            net = torch.compile(net, **({'backend': t['compile']} if isinstance(t['compile'], str) else {}))
        log.info(f"{cfg['model']['name']}: {self.n_params / 1e6:.2f}M params, {self.world} process(es) on "
                 f"{self.device}, global batch {self.total_batch} = {t['batch_size_per_gpu']} x {self.world} x "
                 f"{self.accum} accumulation, lr {self.optimizer.param_groups[0]['lr']:.2e} "
                 f"(peak {self.scheduler.base_values[0]:.2e}), {self.steps_per_epoch} steps/epoch, "
                 f"{self.num_epochs} epochs, precision {self.dtype or torch.float32}, {self.form}")
        metrics = self.resumed_metrics
        self.t_start = time.time()
        while self.epoch < self.num_epochs:
            train_loss, img_skips = self.train_epoch(net)
            self.scheduler.step(self.epoch + 1)
            if self.world > 1:  # average BN running stats over ranks (already equal with SyncBN, not without)
                distribute_bn(self.model, self.world, reduce=True)
                if self.ema is not None:
                    distribute_bn(self.ema.module, self.world, reduce=True)
            metrics = self.validate(train_loss, img_skips)
            if self.rank == 0:
                self.save(metrics)
                with open(os.path.join(self.work_dir, 'log.jsonl'), 'a') as f:
                    f.write(json.dumps(metrics) + '\n')
                for k, v in metrics.items():
                    if v is not None:
                        self.tb.add_scalar(f'epoch/{k}', v, self.epoch)
            self.epoch += 1
        return self.finish(metrics)

    def train_epoch(self, net):
        t = self.cfg['train']
        net.train()
        self.epoch_lr = self.optimizer.param_groups[0]['lr']
        seed_all(t['seed'] + 10007 * self.epoch + self.rank)  # exact resume, different augmentation per rank
        self.loader.sampler.set_epoch(self.epoch)
        fault = int(os.environ.get('OVERLOCK_FAULT_NAN_STEP', -1))
        loss_sum, n_loss, img_skips, bad = 0.0, 0, 0, None  # bad: first non-finite loss of this step
        t0 = t_log = time.time()
        steps_done = 0
        for i, (images, target, skipped) in enumerate(self.loader):
            if steps_done >= self.steps_per_epoch:
                break
            img_skips += int(skipped.sum())
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, target = self.mixup(images, target)
            boundary = (i + 1) % self.accum == 0
            accumulating = self.world > 1 and not boundary
            with net.no_sync() if accumulating else contextlib.nullcontext():  # all-reduce only on the last one
                with autocast(self.device, self.dtype):
                    loss = self.criterion(net(images), target)
                if self.step == fault:
                    loss = loss * float('nan')
                # backward even when non-finite, so DDP ranks stay in lockstep; the grads are dropped below
                (self.scaler.scale(loss / self.accum) if self.scaler else loss / self.accum).backward()
            value = loss.item()
            if math.isfinite(value):
                loss_sum, n_loss = loss_sum + value, n_loss + 1
            elif bad is None:
                bad = value
            if not boundary:
                continue
            if self.all_agree_bad(bad is not None):
                self.handle_nonfinite(bad, i)
                bad = None
            else:
                self.optimizer_step()
            self.step += 1
            steps_done += 1
            self.scheduler.step_update(self.step)
            if self.rank == 0 and (steps_done % t['log_interval'] == 0 or steps_done == self.steps_per_epoch):
                now = time.time()
                ips = t['log_interval'] * self.total_batch / (now - t_log) if steps_done % t['log_interval'] == 0 \
                    else steps_done * self.total_batch / (now - t0)
                t_log = now
                per_step = (now - t0) / steps_done
                eta_epoch = per_step * (self.steps_per_epoch - steps_done)
                eta_all = eta_epoch + per_step * self.steps_per_epoch * (self.num_epochs - self.epoch - 1)
                lr = self.optimizer.param_groups[0]['lr']
                log.info(f'epoch {self.epoch}/{self.num_epochs} [{steps_done}/{self.steps_per_epoch}] step {self.step} '
                         f'loss {value:.4f} ({loss_sum / max(n_loss, 1):.4f}) lr {lr:.3e} {ips:.1f} img/s '
                         f'eta epoch {_hms(eta_epoch)} total {_hms(eta_all)}')
                self.tb.add_scalar('train/loss', value, self.step)
                self.tb.add_scalar('train/lr', lr, self.step)
        stats = torch.tensor([loss_sum, n_loss, img_skips], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(stats)
        if stats[2] > 0:
            log.warning(f'epoch {self.epoch}: {int(stats[2])} unreadable image(s) replaced by the next readable one')
        return stats[0].item() / max(stats[1].item(), 1), int(stats[2].item())

    def all_agree_bad(self, bad):
        flag = torch.tensor([float(bad)], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def handle_nonfinite(self, value, i):
        value = 'on another rank' if value is None else value
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg['train']['skip_nonfinite']:
            self.skipped_steps += 1
            log.warning(f'non-finite loss ({value}) at step {self.step}: step skipped '
                        f'({self.skipped_steps} skipped so far)')
            return
        last = os.path.join(self.work_dir, 'checkpoint-last.pth')
        last = last if os.path.isfile(last) else 'none (no epoch finished yet)'
        raise SystemExit(f'non-finite loss ({value}) at step {self.step} (epoch {self.epoch}, iter {i}); stopped '
                         f'before updating the weights. Last good checkpoint: {last}. Resume with --resume auto, '
                         f'e.g. with a lower lr or train.amp_dtype=bfloat16, or set train.skip_nonfinite=true')

    def optimizer_step(self):
        clip = self.cfg['train']['clip_grad']
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip:
            dispatch_clip_grad(self.model.parameters(), clip, mode='norm')
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def validate(self, train_loss, img_skips):
        res = evaluate(self.model, self.val_loader, self.device, self.dtype, self.world)
        m = {'epoch': self.epoch, 'step': self.step, 'train_loss': train_loss, 'top1': res['top1'],
             'top5': res['top5'], 'val_loss': res['loss'], 'lr': self.epoch_lr,
             'ema_top1': None, 'ema_top5': None, 'skipped_steps': self.skipped_steps, 'skipped_images': img_skips}
        if res['top1'] > self.best['top1']:
            self.best.update(top1=res['top1'], epoch=self.epoch)
        if self.ema is not None:
            res_ema = evaluate(self.ema.module, self.val_loader, self.device, self.dtype, self.world)
            m.update(ema_top1=res_ema['top1'], ema_top5=res_ema['top5'])
            if res_ema['top1'] > self.best['ema_top1']:
                self.best.update(ema_top1=res_ema['top1'], ema_epoch=self.epoch)
        log.info(f"epoch {self.epoch} done: train loss {train_loss:.4f}, top1 {m['top1']:.2f} top5 {m['top5']:.2f}"
                 + (f", EMA top1 {m['ema_top1']:.2f}" if self.ema is not None else '')
                 + f" (best {self.best['top1']:.2f} @ {self.best['epoch']}), "
                 + f'{_hms(time.time() - self.t_start)} elapsed')
        return m

    def finish(self, metrics):
        """results.json: last-epoch metrics, best epochs, and (optionally) every rank's weight hash."""
        hashes = None
        if self.cfg['train']['check_rank_consistency']:
            mine = state_hash(self.model) + (state_hash(self.ema.module) if self.ema is not None else '')
            hashes = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(hashes, mine)
            else:
                hashes = [mine]
            if len(set(hashes)) > 1:
                log.warning('ranks hold different weights at the end of training: ' + ', '.join(h[:12] for h in hashes))
        if self.rank == 0:
            # top1/top5 (and ema_*) are the last epoch's; 'best' holds each one's best epoch
            res = {'task': 'cls', 'model': self.cfg['model']['name'], 'figure': 'last epoch',
                   'top1': metrics.get('top1'),
                   'top5': metrics.get('top5'), 'ema_top1': metrics.get('ema_top1'),
                   'ema_top5': metrics.get('ema_top5'), 'params': self.n_params, 'epochs': self.num_epochs,
                   'steps': self.step, 'skipped_steps': self.skipped_steps, 'best': self.best,
                   'precision': str(self.dtype or torch.float32).replace('torch.', ''),
                   'decay_groups': self.cfg['train']['decay_groups'], 'form': self.form,
                   'train_time_s': round(time.time() - self.t_start, 1), 'world_size': self.world,
                   'rank_state_sha256': hashes}
            with open(os.path.join(self.work_dir, 'results.json'), 'w') as f:
                json.dump(res, f, indent=2)
            self.tb.close()
            log.info(f'done: {json.dumps(res)}')
        return metrics


def _hms(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


if __name__ == '__main__':
    main()
