#!/usr/bin/env python
"""Run an ablation grid (cartesian product of config overrides) through the normal launcher, then collect it.

Why: the paper's ablations (kernel sizes, small-kernel size, heads, context on/off, ContMix vs static kernels)
are single-switch changes of one config; a sweep should reuse the exact training entry point
(`tools/dist_train.sh CONFIG NGPUS --work-dir DIR --cfg-options ...`) so a cell is reproducible on its own.

Grid syntax: KEY=[v1,v2,...] (YAML values; a scalar means one value; to sweep over one list value write
[[7,7,7,7]]). The generic backbone switches kernel_sizes, smk_size, sub_num_heads, use_context, mixer may be
written bare or with any `model.` prefix: they become `model.kwargs.KEY` for a classification .yaml config (forwarded
to timm.create_model by classification/config.py's open `model.kwargs` section) and `model.backbone.KEY` for an
mmdet/mmseg .py config. Other keys pass through as given.

Example:
  python tools/sweep.py configs/cls/demo.yaml --dry-run --grid \
      model.kernel_sizes=[[17,15,13,7],[7,7,7,7]] model.smk_size=[3,5] \
      model.use_context=[true,false] model.mixer=[contmix,static]
Each cell trains in WORK_ROOT/<cell name>/ (with sweep_cell.json: config, overrides, command, return code);
afterwards tools/collect_results.py tabulates WORK_ROOT into WORK_ROOT/results.md.
"""
import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import collect_results  # noqa: E402

BACKBONE_KEYS = ('kernel_sizes', 'smk_size', 'sub_num_heads', 'use_context', 'mixer')
CLS_PREFIX, MM_PREFIX = 'model.kwargs.', 'model.backbone.'  # where each config type keeps constructor kwargs


def is_mm_config(config):
    return str(config).endswith('.py')


def map_key(key, mm):
    """Generic backbone switch -> the config-type-specific dotted key; anything else unchanged."""
    base = re.sub(r'^(model\.)?(backbone\.|kwargs\.)?', '', key)
    if base in BACKBONE_KEYS:
        return (MM_PREFIX if mm else CLS_PREFIX) + base
    return key


def parse_grid(items, mm):
    """['k=[a,b]', ...] -> list of (mapped key, [values]) in the given order."""
    grid = []
    for item in items:
        if '=' not in item:
            raise SystemExit(f'sweep: grid entry {item!r} is not KEY=[v1,v2,...]')
        key, raw = item.split('=', 1)
        vals = yaml.safe_load(raw)
        grid.append((map_key(key.strip(), mm), vals if isinstance(vals, list) else [vals]))
    return grid


def fmt_value(v):
    """Command-line form understood by both mmengine's DictAction and a YAML parser."""
    if isinstance(v, bool):
        return 'true' if v else 'false'
    if v is None:
        return 'None'
    if isinstance(v, (list, tuple)):
        return '[' + ','.join(fmt_value(x) for x in v) + ']'
    return str(v)


def cell_name(overrides):
    parts = []
    for k, v in overrides.items():
        val = '.'.join(map(fmt_value, v)) if isinstance(v, (list, tuple)) else fmt_value(v)
        parts.append(f'{k.rsplit(".", 1)[-1]}-{val}')
    return re.sub(r'[^A-Za-z0-9.\-_]+', '_', '_'.join(parts)) or 'base'


def expand(grid):
    """Cartesian product -> list of {key: value} dicts (first grid key varies slowest)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def build_commands(config, grid, ngpus, work_root, extra=()):
    """[(cell name, work dir, overrides, argv)] for every grid cell."""
    cells = []
    for ov in expand(grid):
        name = cell_name(ov)
        wd = Path(work_root) / name
        opts = [f'{k}={fmt_value(v)}' for k, v in ov.items()] + list(extra)
        argv = ['bash', 'tools/dist_train.sh', str(config), str(ngpus), '--work-dir', str(wd)]
        if opts:
            argv += ['--cfg-options', *opts]
        cells.append((name, wd, ov, argv))
    return cells


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('--grid', nargs='+', required=True, metavar='KEY=[V1,V2]')
    p.add_argument('--ngpus', type=int, default=1, help='processes per cell (GPUs; CPU processes without one)')
    p.add_argument('--work-root', default=None, help='default: work_dirs/sweep_<config name>')
    p.add_argument('--cfg-options', nargs='*', default=[], help='fixed overrides added to every cell')
    p.add_argument('--dry-run', action='store_true', help='print the commands and exit')
    p.add_argument('--keep-going', action='store_true', help='run the remaining cells after a failure')
    args = p.parse_args(argv)
    mm = is_mm_config(args.config)
    work_root = Path(args.work_root or f'work_dirs/sweep_{Path(args.config).stem}')
    cells = build_commands(args.config, parse_grid(args.grid, mm), args.ngpus, work_root, args.cfg_options)
    print(f'[sweep] {len(cells)} cell(s) of {args.config} ({"mm" if mm else "cls"} config) under {work_root}')
    if args.dry_run:
        for _, _, _, cmd in cells:
            print(shlex.join(cmd))
        return 0
    failed = []
    for i, (name, wd, ov, cmd) in enumerate(cells):
        print(f'[sweep] cell {i + 1}/{len(cells)} {name}: {shlex.join(cmd)}', flush=True)
        wd.mkdir(parents=True, exist_ok=True)
        meta = dict(config=str(args.config), overrides=ov, command=shlex.join(cmd))
        (wd / 'sweep_cell.json').write_text(json.dumps(meta, indent=1))
        rc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy()).returncode
        (wd / 'sweep_cell.json').write_text(json.dumps(dict(meta, returncode=rc), indent=1))
        if rc:
            failed.append(name)
            print(f'[sweep] cell {name} failed (exit {rc})', file=sys.stderr)
            if not args.keep_going:
                break
    tables = collect_results.build_tables(collect_results.find_runs([work_root]), paper_rows=False)
    md = collect_results.to_markdown({'sweep': tables['sweep']}, skip_empty_sweep=False)
    (work_root / 'results.md').write_text(md)
    print(md + f'[sweep] table: {work_root / "results.md"}')
    if failed:
        print(f'[sweep] FAILED cells: {", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
