#!/usr/bin/env python
"""Export an OverLoCK model to ONNX (dynamic batch and image size) and check it in onnxruntime.

    python tools/export_onnx.py overlock_t overlock_t_in1k_224.pth overlock_t.onnx
    python tools/export_onnx.py configs/cls/overlock_t.yaml output/overlock_t/best.pth overlock_t.onnx
    python tools/export_onnx.py test_overlock none test.onnx --exporter torchscript      # random weights
    python tools/export_onnx.py overlock_t overlock_t_in1k_224.pth backbone.onnx --dense det

The model (a timm variant name or a classification YAML config) is built, the checkpoint loaded (``none`` or ``-``:
random weights), switched to its inference form (DilatedReparamBlocks merged, BatchNorms folded) and exported with
standard operators only (``overlock_core.export``). ``--dense det|seg`` exports the detection/segmentation backbone
(four normalised maps, outputs ``out0``..``out3``) instead of the classifier (output ``logits``).

The file is then run in onnxruntime on random inputs at two sizes and batch sizes and compared with the PyTorch
model; the tool exits non-zero when the file does not load or the maximum relative error exceeds ``--tol``. The graph
is valid for inputs whose shorter side is at least the printed minimum (193 for the default kernels): smaller maps
would take ContMix's small-map resize, which the export leaves out.
"""
import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402
import torch  # noqa: E402

import overlock_core  # noqa: E402,F401  registers the timm models
from overlock_core.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_weights  # noqa
from overlock_core.export import check_onnx, export_onnx, min_input_size, prepare_for_export  # noqa: E402


def _model_spec(target: str, num_classes):
    """(timm name, constructor kwargs, num_classes) of a variant name or a classification YAML config."""
    if target.endswith(('.yaml', '.yml')) or os.path.isfile(target):
        from classification.config import load_config
        cfg = load_config(target)
        nc = cfg['data']['num_classes'] if num_classes is None else num_classes
        return cfg['model']['name'], dict(cfg['model']['kwargs']), nc
    name = target if target.startswith(('overlock_', 'test_overlock')) else \
        'test_overlock' if target == 'test' else f'overlock_{target}'
    return name, {}, 1000 if num_classes is None else num_classes


def build(target: str, checkpoint: str, dense=None, num_classes=None) -> torch.nn.Module:
    """The eval model with the checkpoint's weights (``none``/``-``: random), deploy-form checkpoints included."""
    name, kwargs, nc = _model_spec(target, num_classes)
    sd = None
    if checkpoint not in ('none', '-'):
        sd = extract_state_dict(load_checkpoint_file(checkpoint))
        if 'head.4.weight' in sd and num_classes is None and not dense:
            nc = sd['head.4.weight'].shape[0]
        kwargs['deploy'] = any(k.endswith('lk_origin.bias') for k in sd)  # a *_reparam checkpoint
    if dense:
        kwargs['dense'] = dense
    model = timm.create_model(name, num_classes=nc, **kwargs)
    if sd is not None:
        load_weights(model, sd, strict=not dense, allow_missing=(r'^extra_norm\.', r'^h_proj\.') if dense else ())
    return model.eval()


def _shapes(text: str):
    out = []
    for item in text.split(','):
        b, hw = item.split(':') if ':' in item else ('1', item)
        h, w = hw.lower().split('x')
        out.append((int(b), int(h), int(w)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('model', help='timm variant (overlock_t, test_overlock, t, ...) or a configs/cls YAML file')
    ap.add_argument('checkpoint', help="checkpoint file, or 'none' / '-' for random weights")
    ap.add_argument('out', help='the .onnx file to write')
    ap.add_argument('--dense', choices=['det', 'seg'], help='export the detection/segmentation backbone')
    ap.add_argument('--num-classes', type=int, help='classifier width (default: checkpoint, config or 1000)')
    ap.add_argument('--size', type=int, default=224, help='side of the example input the graph is traced with')
    ap.add_argument('--check', default=None,
                    help="inputs checked in onnxruntime, 'B:HxW,...' (default: 1:SxS,2:(S+32)x(S+96), S = --size)")
    ap.add_argument('--opset', type=int, default=18)
    ap.add_argument('--exporter', choices=['auto', 'dynamo', 'torchscript'], default='auto',
                    help="auto: torch.export's exporter (dynamo=True), the TorchScript one if that fails")
    ap.add_argument('--tol', type=float, default=1e-4, help='largest relative error accepted')
    args = ap.parse_args(argv)
    try:
        model = prepare_for_export(build(args.model, args.checkpoint, args.dense, args.num_classes), inplace=True)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f'cannot build the model: {e}')
    low = min_input_size(model)
    size = max(args.size, low)
    checks = _shapes(args.check) if args.check else [(1, size, size), (2, size + 32, size + 96)]
    small = [s for s in checks if min(s[1:]) < low]
    if small:
        raise SystemExit(f'--check sizes {small} are below the minimum input side {low} of the exported graph')
    dynamo = {'auto': None, 'dynamo': True, 'torchscript': False}[args.exporter]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        used = export_onnx(model, args.out, size=size, opset=args.opset, dynamo=dynamo)
    except RuntimeError as e:
        raise SystemExit(str(e))
    print(f'exported {args.out} ({used} exporter, opset {args.opset}); dynamic batch and image size, '
          f'inputs with a shorter side >= {low}')
    try:
        import onnx
        onnx.checker.check_model(args.out)
        errors = check_onnx(model, args.out, checks)
    except Exception as e:  # a file that does not load or run
        print(f'ERROR: {args.out} does not load or run in onnxruntime: {type(e).__name__}: {e}', file=sys.stderr)
        return 2
    for shape, err in errors.items():
        print(f'  input {shape}: max relative error {err:.3g}')
    worst = max(errors.values())
    print(f'max relative error {worst:.3g} (tolerance {args.tol:g})')
    if not worst <= args.tol:
        print(f'ERROR: onnxruntime differs from PyTorch by {worst:.3g} > {args.tol:g}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
