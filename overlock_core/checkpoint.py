"""Safe checkpoint loading, key adaptation and atomic saving, shared by every task.

Loading never executes code: ``torch.load(weights_only=True)`` (plus, for that load only, the few classes mmengine's
checkpoints hold: ``overlock_core.safe_globals``) or safetensors. Any checkpoint layout met in practice is accepted: a
plain state dict, ``state_dict`` / ``state_dict_ema`` / ``model`` entries, ``module.`` (DDP) and ``backbone.``
(detector, segmentor) prefixes, the authors' training or re-parameterised (``_reparam``) files. A checkpoint that does
not fit the model is refused with a report of what is missing, unexpected or mis-shaped.
"""
import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Dict, Iterable, Mapping, Union

import torch
import torch.nn as nn

from .safe_globals import mmengine_checkpoint_globals

__all__ = ['CheckpointError', 'load_checkpoint_file', 'extract_state_dict', 'adapt_state_dict', 'load_weights',
           'save_atomic']

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe, corrupt or does not fit the model."""


def load_checkpoint_file(path: PathLike) -> Any:
    """Read a checkpoint without executing code. Raises CheckpointError naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f'corrupt safetensors file {path}: {e}') from e
    try:
        with mmengine_checkpoint_globals():  # the few classes mmengine's own checkpoints hold, for this load only
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'refusing to load {path}: it holds Python objects that are not weights ({first}). '
                              f'Only weights-only checkpoints are loaded; re-save the state dict alone.') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f'corrupt or truncated checkpoint {path}: {e}') from e


def extract_state_dict(obj: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint object (EMA weights first when ``use_ema``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint holds a {type(obj).__name__}, not a state dict')
    keys = ('state_dict', 'model', 'state_dict_ema', 'model_ema')  # EMA only when nothing else is there
    if use_ema:
        keys = keys[2:] + keys[:2]
    for key in keys:
        if isinstance(obj.get(key), Mapping) and obj[key]:
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError('checkpoint holds no tensors')
    return sd


def _strip_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if any(k.startswith('backbone.') for k in sd):  # detector / segmentor: keep the backbone only
        sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
    return {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in sd.items()}


def adapt_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto ``model``: strip wrappers, drop heads/dense modules the model does not have,
    and re-parameterise training-form kernels when the model is in deploy form."""
    from .models.layers import DilatedReparamBlock
    sd = _strip_prefixes(dict(sd))
    own = model.state_dict()
    for prefix in ('head.', 'aux_head.', 'extra_norm.', 'h_proj.'):
        if not any(k.startswith(prefix) for k in own):
            sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    if any(k.startswith('extra_norm.') for k in own):  # seg model from a det checkpoint: no 5th norm
        sd = {k: v for k, v in sd.items() if not k.startswith('extra_norm.') or k in own}
    for name, m in model.named_modules():
        if isinstance(m, DilatedReparamBlock) and m.deploy and f'{name}.origin_bn.weight' in sd:
            sub = {k[len(name) + 1:]: sd.pop(k) for k in list(sd) if k.startswith(name + '.')}
            drb = DilatedReparamBlock(m.lk_origin.weight.shape[0], m.kernel_size)
            drb.load_state_dict(sub)
            drb.reparameterize()
            sd.update({f'{name}.{k}': v for k, v in drb.state_dict().items()})
    return sd


def _report(items: Iterable[str], limit: int = 6) -> str:
    items = sorted(items)
    more = f', ... (+{len(items) - limit} more)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def load_weights(model: nn.Module, src: Union[PathLike, Dict[str, torch.Tensor]], strict: bool = True,
                 use_ema: bool = False, allow_missing: Iterable[str] = (), allow_new_classifier: bool = False,
                 ) -> Dict[str, list]:
    """Load a checkpoint file or state dict into ``model`` through ``adapt_state_dict``.

    Mis-shaped tensors always raise (a checkpoint of another variant). Missing keys raise unless they match one of
    the ``allow_missing`` regexes; unexpected keys raise when ``strict``. ``allow_new_classifier`` drops a classifier
    whose class count differs (fine-tuning). Returns the missing/unexpected key lists.
    """
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else 'state dict'
    sd = extract_state_dict(load_checkpoint_file(src) if isinstance(src, (str, os.PathLike)) else src, use_ema)
    sd = adapt_state_dict(sd, model)
    own = model.state_dict()
    classifier = re.compile(r'^(head\.4|aux_head\.2)\.')
    if allow_new_classifier:
        sd = {k: v for k, v in sd.items() if not (classifier.match(k) and k in own and own[k].shape != v.shape)}
        allow_missing = tuple(allow_missing) + (classifier.pattern,)
    mismatched = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in sd.items()
                  if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not any(re.search(p, k) for p in allow_missing)]
    unexpected = [k for k in sd if k not in own]
    problems = []
    if mismatched:
        problems.append(f'{len(mismatched)} mis-shaped: {_report(mismatched)}')
    if missing:
        problems.append(f'{len(missing)} missing: {_report(missing)}')
    if unexpected and strict:
        problems.append(f'{len(unexpected)} unexpected: {_report(unexpected)}')
    if problems:
        hint = ''
        if any('lk_origin.bias' in k for k in unexpected) or any('origin_bn' in k for k in missing):
            hint = ' (this looks like a re-parameterised checkpoint: build the model with deploy=True)'
        elif mismatched:
            hint = ' (is it a checkpoint of another variant?)'
        raise CheckpointError(f'checkpoint {name} does not fit {type(model).__name__}: '
                              + '; '.join(problems) + hint)
    model.load_state_dict(sd, strict=False)
    return dict(missing=[k for k in own if k not in sd], unexpected=unexpected)


def save_atomic(obj: Any, path: PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename: a kill while saving never leaves a
    truncated checkpoint behind under ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass
