"""Inference export: the plain-operator forward, the inference form, ONNX export and its check.

The model's three operators (``ops``: the depth-wise conv, GRN and ContMix's aggregation) run fused kernels, custom
autograd functions and ``torch.library`` operators picked by device and map size, and the accelerated module forms
(``accel``) add more. None of that can be traced or exported, so while ``plain_ops_active()`` holds the operators
use standard PyTorch operators only: depth-wise convs as ``F.conv2d``, GRN and ContMix's aggregation
(``ops.neighborhood.kernel_av_plain``) as composites, and accelerated modules run the paper form. It holds inside
``plain_ops()`` and, on its own, while ``torch.export`` / ``torch.onnx.export`` / ``torch.jit.trace`` run.
Results equal the eager model's up to float rounding. ``prepare_for_export`` gives the inference form (merged,
BatchNorms folded) with ContMix's 7x7 region pooling as matmuls, which ONNX can run at any image size.

``torch.fx`` symbolic tracing (timm's feature extraction) keeps the eager kernels instead, as leaf modules and
functions (``timm.layers.register_notrace_module`` / ``register_notrace_function`` in ``models.layers``), so a
traced model computes exactly what the eager one does, gradients included.

ContMix raises maps shorter than its kernel to K (``contmix_size``); that shape-dependent rule is evaluated when the
graph is exported, so an exported graph serves inputs whose stride-16 and stride-32 maps are at least K3 and K4
wide: ``min_input_size(model)`` (193 pixels for every variant's default kernels).
"""
import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.fx import _symbolic_trace
from torch.nn.modules.utils import _pair

# fx symbolic tracing only (is_fx_tracing also answers True under torch.export, and warns; older torch lacks it)
_fx_symbolic_tracing = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', _symbolic_trace.is_fx_tracing)

__all__ = ['AdaptiveAvgPool2dPlain', 'adaptive_avg_pool2d_plain', 'check_onnx', 'export_onnx', 'min_input_size',
           'plain_forward', 'plain_ops', 'plain_ops_active', 'prepare_for_export']

_PLAIN = False  # set by ``plain_ops``


@contextlib.contextmanager
def plain_ops(enable: bool = True) -> Iterator[None]:
    """Run forwards with standard PyTorch operators only (process-wide while inside): to check the export form
    against the eager model in eager mode."""
    global _PLAIN
    before, _PLAIN = _PLAIN, enable
    try:
        yield
    finally:
        _PLAIN = before


def plain_ops_active() -> bool:
    """Whether forwards must keep to standard operators: inside ``plain_ops``, or while torch.export, the ONNX
    exporters or ``torch.jit.trace`` trace the model (``torch.compile`` keeps the custom operators)."""
    if torch.compiler.is_compiling():  # first: the compiler folds it to a constant (no graph break)
        return _PLAIN or torch.compiler.is_exporting()
    return _PLAIN or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def plain_forward() -> bool:
    """``plain_ops_active()`` or ``torch.fx`` symbolic tracing: Python-level paths that test tensor attributes
    (device, dtype, size) or apply autograd functions take their plain form."""
    if torch.compiler.is_compiling():
        return plain_ops_active()
    return _fx_symbolic_tracing() or plain_ops_active()


def _pool_matrix(length, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, length) averaging matrix of adaptive average pooling along one axis: row i averages positions
    floor(i L / out) to ceil((i + 1) L / out) - 1, PyTorch's bins."""
    i = torch.arange(out, device=like.device)
    start, end = (i * length) // out, ((i + 1) * length + out - 1) // out
    j = torch.arange(length, device=like.device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d_plain(x: torch.Tensor, output_size: Tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as two matmuls with averaging matrices built from the map size at run time: ONNX
    has no adaptive pooling, and the exporters fix its bins to the example input's size."""
    rows = _pool_matrix(x.shape[-2], output_size[0], x)
    cols = _pool_matrix(x.shape[-1], output_size[1], x)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class AdaptiveAvgPool2dPlain(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d (no state) that pools through ``adaptive_avg_pool2d_plain`` while exported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not plain_ops_active():
            return super().forward(x)
        size = _pair(self.output_size)
        size = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(size))
        return adaptive_avg_pool2d_plain(x, size)


def prepare_for_export(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inference form of ``model`` for export: eval mode, DilatedReparamBlocks merged and BatchNorms folded
    (``timm.utils.reparameterize_model``), the paper form of any accelerated module (``accel.restore``), and
    adaptive average pools to more than 1x1 (ContMix's 7x7 region centres) pooling through matmuls, which export
    with dynamic image size (``AdaptiveAvgPool2dPlain``); a copy unless ``inplace``."""
    from timm.utils import reparameterize_model

    from .accel import restore
    model = model if inplace else copy.deepcopy(model)
    model = reparameterize_model(restore(model).eval(), inplace=True).eval()  # new merged convs start in train mode
    for m in model.modules():
        if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) != (1, 1):
            m.__class__ = AdaptiveAvgPool2dPlain
    return model


def _stage_sizes(size: int, stages: int = 5) -> List[int]:
    """Map sizes at strides 2, 4, ..., 2**stages of an input side: every stride-2 step is a 3x3 conv, padding 1."""
    out = []
    for _ in range(stages):
        size = (size - 1) // 2 + 1
        out.append(size)
    return out


def min_input_size(model) -> int:
    """The shortest input side for which ContMix's small-map rule resizes nothing (stride-16 map >= K3 and
    stride-32 map >= K4): the sizes an exported graph with dynamic image size is valid for. ``model``: an OverLoCK
    (or timm's features_only wrapper of one), a variant name or an architecture dict."""
    if isinstance(model, (str, dict)):
        from .models import get_arch
        kernels = get_arch('test' if model == 'test_overlock' else model)['kernel_sizes']
    else:
        kernels = getattr(model, 'model', model).arch_cfg['kernel_sizes']  # features_only wraps the network
    size = 1
    while True:
        s = _stage_sizes(size)
        if s[3] >= kernels[2] and s[4] >= kernels[3]:
            return size
        size += 1


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def export_onnx(model: nn.Module, path: str, size: int = 224, opset: int = 18, dynamo: Optional[bool] = None,
                output_names: Optional[Sequence[str]] = None) -> str:
    """Export ``model`` (its inference form, see ``prepare_for_export``) to ONNX with dynamic batch and image size.
    ``dynamo``: True or False picks the exporter; None tries torch.export's (``dynamo=True``) and falls back to
    the TorchScript one. Returns the exporter used ('dynamo' or 'torchscript')."""
    import warnings
    size = max(size, min_input_size(model))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        n_out = len(_flatten(model(x)))
    names = list(output_names or (['logits'] if n_out == 1 else [f'out{i}' for i in range(n_out)]))
    tries = [True, False] if dynamo is None else [dynamo]
    errors = []
    for use_dynamo in tries:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                if use_dynamo:
                    dims = torch.export.Dim.DYNAMIC
                    prog = torch.onnx.export(model, (x,), input_names=['image'], output_names=names,
                                             dynamic_shapes=({0: dims, 2: dims, 3: dims},), opset_version=opset,
                                             dynamo=True, external_data=False, verbose=False)
                    prog.save(path)
                else:
                    axes = {'image': {0: 'batch', 2: 'height', 3: 'width'}}
                    axes.update({n: {0: 'batch'} for n in names})
                    torch.onnx.export(model, (x,), path, input_names=['image'], output_names=names,
                                      dynamic_axes=axes, opset_version=opset, dynamo=False)
            return 'dynamo' if use_dynamo else 'torchscript'
        except Exception as e:  # the next exporter, or the error of every one
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    raise RuntimeError('ONNX export failed: ' + '; '.join(errors))


def check_onnx(model: nn.Module, path: str, inputs: Sequence[Tuple[int, int, int]]) -> Dict[str, float]:
    """Run the ONNX file in onnxruntime on random (batch, height, width) inputs and compare with ``model`` in
    eager mode: the maximum relative error (max |onnx - torch| / max |torch|) per input shape."""
    import numpy as np
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    errors = {}
    for b, h, w in inputs:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = [t.numpy() for t in _flatten(model(x))]
        got = sess.run(None, {name: x.numpy()})
        if len(got) != len(ref):
            raise RuntimeError(f'{path}: {len(got)} outputs, the model has {len(ref)}')
        err = 0.0
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise RuntimeError(f'{path}: output shape {g.shape} at input {(b, 3, h, w)}, the model gives {r.shape}')
            err = max(err, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)))
        errors[f'{b}x3x{h}x{w}'] = err
    return errors
