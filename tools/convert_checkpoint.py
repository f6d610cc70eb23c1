#!/usr/bin/env python
"""Convert an OverLoCK classification checkpoint (ours or the authors') to a re-parameterised and/or safetensors copy.

  python tools/convert_checkpoint.py overlock_t_in1k_224.pth --variant t --reparam --safetensors
      -> overlock_t_in1k_224_reparam.pth and overlock_t_in1k_224_reparam.safetensors

The input is read safely (weights only) and must fit the variant exactly; the re-parameterised model is checked
against the original on a random batch before anything is written (writes are atomic).
"""
import argparse
import os
import sys

import torch

from overlock_core.checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_weights, \
    save_atomic
from overlock_core.models import OverLoCK, get_arch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src')
    ap.add_argument('--variant', required=True, help='xt, t, s, b or test')
    ap.add_argument('--num-classes', type=int, default=None, help='default: read from the checkpoint')
    ap.add_argument('--use-ema', action='store_true', help='take state_dict_ema when present')
    ap.add_argument('--reparam', action='store_true', help='write the deploy (re-parameterised) form')
    ap.add_argument('--drop-aux', action='store_true', help='drop the auxiliary head')
    ap.add_argument('--safetensors', action='store_true', help='also write a .safetensors copy')
    ap.add_argument('--out', help='output path without extension (default: next to the input)')
    args = ap.parse_args(argv)
    try:
        get_arch(args.variant)
        sd = extract_state_dict(load_checkpoint_file(args.src), use_ema=args.use_ema)
        sd = {k.replace('module.', '', 1) if k.startswith('module.') else k: v for k, v in sd.items()}
        num_classes = args.num_classes or (sd['head.4.weight'].shape[0] if 'head.4.weight' in sd else 1000)
        has_aux = any(k.startswith('aux_head.') for k in sd) and not args.drop_aux
        deploy_in = any(k.endswith('lk_origin.bias') for k in sd)
        model = OverLoCK(args.variant, num_classes=num_classes, aux_head=has_aux, deploy=deploy_in).eval()
        load_weights(model, sd, strict=not args.drop_aux)
    except (CheckpointError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    stem = args.out or os.path.splitext(args.src)[0]
    if args.reparam and not deploy_in:
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            ref = model(x)
            model.reparameterize()
            err = (model(x) - ref).abs().max().item()
        print(f're-parameterised: max |logit difference| on a random batch = {err:.2e}')
        if err > 1e-3 * max(1.0, ref.abs().max().item()):
            print('error: re-parameterisation changed the outputs', file=sys.stderr)
            return 1
        stem = stem if args.out else stem + '_reparam'
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_atomic(state, stem + '.pth')
    print(f'wrote {stem}.pth ({sum(v.numel() for v in state.values() if v.is_floating_point()) / 1e6:.2f}M values)')
    if args.safetensors:
        from safetensors.torch import save_file
        tmp = stem + '.safetensors.tmp'
        save_file(state, tmp, metadata=dict(variant=args.variant, deploy=str(args.reparam or deploy_in)))
        os.replace(tmp, stem + '.safetensors')
        print(f'wrote {stem}.safetensors')
    return 0


if __name__ == '__main__':
    sys.exit(main())
