"""YAML configs for classification: schema with defaults, `_base_` inheritance, `--cfg-options` overrides.

Why a fixed schema: every key a run can use is listed in DEFAULTS, so a typo in a YAML file or in
`--cfg-options train.epochz=10` is a one-line error naming the key instead of a silently ignored setting.
The defaults are the authors' ImageNet-1K recipe; variant configs only change what differs. Deviations from it are
opt-in keys (``train.decay_groups: extended``, ``train.amp_dtype: bfloat16``).
"""
import copy
import re
from pathlib import Path

import yaml

_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')

DEFAULTS = {
    'model': {
        'name': 'overlock_t',       # any timm model name; OverLoCK entrypoints come from `import overlock_core`
        'drop_path_rate': 0.15,
        'aux_head': True,           # deep supervision on the Overview-Net (training only)
        'aux_weight': 0.4,          # loss = CE(main) + aux_weight * CE(aux)
        'kwargs': {},               # extra constructor kwargs (ablation switches: kernel_sizes, use_context, mixer...)
        'pretrained': None,         # path of initial weights (fine-tuning); the classifier must match
        'accel': 'auto',            # overlock_core.accel: auto (CPU: accelerated, lean; GPU: the paper form), off,
                                    # or {lean: true|false|max}
    },
    'data': {
        'data_dir': 'data/imagenet',
        'train_split': 'train',
        'val_split': 'val',
        'num_classes': 1000,
        'img_size': 224,
        'crop_pct': None,           # eval: resize short side to floor(img_size / crop_pct); None = model default
        'interpolation': 'bicubic',  # eval interpolation
        'mean': [0.485, 0.456, 0.406],
        'std': [0.229, 0.224, 0.225],
        'workers': 8,
        'pin_memory': True,
    },
    'aug': {
        'scale': [0.08, 1.0],
        'ratio': [0.75, 1.3333333333],
        'hflip': 0.5,
        'interpolation': 'random',  # train: random bilinear/bicubic
        'auto_augment': 'rand-m9-mstd0.5-inc1',
        'color_jitter': 0.4,        # timm ignores it when auto_augment is set
        'reprob': 0.25,
        'remode': 'pixel',
        'recount': 1,
        'mixup': 0.8,
        'cutmix': 1.0,
        'mixup_prob': 1.0,
        'mixup_switch_prob': 0.5,
        'mixup_mode': 'batch',
        'smoothing': 0.1,
    },
    'train': {
        'epochs': 300,
        'batch_size': 2048,         # global batch; None = batch_size_per_gpu * world_size (no accumulation)
        'batch_size_per_gpu': 256,  # what one process holds; accumulation = batch_size / (per_gpu * world)
        'lr': None,                 # None = lr_base * batch_size / lr_base_size (paper: 1e-3 * 2048 / 1024)
        'lr_base': 1.0e-3,
        'lr_base_size': 1024,
        'opt': 'adamw',
        'opt_eps': 1.0e-8,
        'opt_betas': [0.9, 0.999],
        'weight_decay': 0.05,
        'decay_groups': 'authors',  # authors: timm's rule (no decay for 1-d tensors and biases only) | extended
        'sched': 'cosine',
        'warmup_epochs': 5,
        'cooldown_epochs': 10,      # timm adds these after `epochs` at min_lr: 310 epochs in total
        'min_lr': 1.0e-5,
        'warmup_lr': 1.0e-6,
        'clip_grad': 5.0,           # global norm, after unscaling; None = off
        'amp': True,
        'amp_dtype': 'auto',        # auto: fp16 + GradScaler on GPUs (the authors'), fp32 on CPUs | float16 | bfloat16
        'sync_bn': True,            # CUDA only (torch's SyncBatchNorm has no CPU kernel)
        'ema': True,
        'ema_decay': 0.9999,
        'grad_checkpointing': False,
        'compile': False,           # true = torch.compile (inductor) or a backend name
        'seed': 42,
        'cudnn_benchmark': True,    # the authors' (timm's): cuDNN times its algorithms per shape, keeps the fastest
        'log_interval': 50,
        'steps_per_epoch': None,    # cap on optimizer steps per epoch (smoke tests); None = whole epoch
        'skip_nonfinite': False,    # False: stop at the first non-finite loss; True: skip that step and count it
        'check_rank_consistency': True,  # at the end, hash every rank's weights and record them in results.json
    },
}


def _merge(base, new, where, strict=True):
    """Recursively merge `new` into `base`; keys must exist in `base` when strict (dict-valued leaves are open)."""
    for key, value in new.items():
        path = f'{where}.{key}' if where else key
        if strict and key not in base:
            known = ', '.join(sorted(base))
            raise SystemExit(f"unknown config key '{path}' (known keys here: {known})")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, path, strict=path != 'model.kwargs')  # kwargs is open: any constructor arg
        else:
            base[key] = _coerce(base.get(key), value, path)
    return base


def _coerce(default, value, path):
    """YAML 1.1 reads `4e-3` (no dot) as a string: make such strings numbers; refuse text where a number belongs."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value) if any(c in value for c in '.eE') else int(value)
    if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, str):
        raise SystemExit(f"config key '{path}' expects a number, got '{value}'")
    if isinstance(default, str) and isinstance(value, (int, float)):
        value = str(value)  # e.g. data.data_dir=2024
    return value


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'config file not found: {path}')
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    bases = cfg.pop('_base_', [])
    merged = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_update(merged, _read_yaml(path.parent / base))
    return _deep_update(merged, cfg)


def _deep_update(dst, src):
    for k, v in src.items():
        dst[k] = _deep_update(dst.get(k, {}), v) if isinstance(v, dict) and isinstance(dst.get(k), dict) else v
    return dst


def parse_overrides(items):
    """`a.b=c` strings -> nested dict; values are parsed as YAML (0.2 -> float, true -> bool, [1,2] -> list)."""
    out = {}
    for item in items or []:
        if '=' not in item:
            raise SystemExit(f"bad --cfg-options item '{item}': expected key=value")
        key, value = item.split('=', 1)
        node = out
        *parents, leaf = key.strip().split('.')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return out


def load_config(path, overrides=None):
    """Defaults <- YAML file (with `_base_`) <- command-line overrides, all checked against the schema."""
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, _read_yaml(path), '')
    _merge(cfg, parse_overrides(overrides), '')
    return cfg


def save_config(cfg, path):
    with open(path, 'w') as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
