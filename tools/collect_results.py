#!/usr/bin/env python
"""Collect finished runs into the paper's tables (Markdown + CSV), our numbers next to the paper's.

Why: results live in three formats (classification `results.json`/`log.jsonl`, mmengine `vis_data/scalars.json`,
test-time `results.json`); this tool reads all of them so a table in the README is one command away.

Tables: ImageNet-1K Top-1 with params/FLOPs; COCO AP^b/AP^m per backbone, detector and schedule; ADE20K mIoU
single-scale / multi-scale; sweep cells (work dirs written by tools/sweep.py) with their overrides. Each row's
'Figure' column says which number it reports: the last epoch / validation of a training run (with the best one and,
for classification, the EMA model's beside it), or the test of a named checkpoint (validate.py, tools/test.py).
Multi-scale mIoU comes from `results_ms.json` or a sub-dir `results.json` with "tta": true (e.g.
`tools/dist_test.sh CFG CKPT N --tta --work-dir WORK_DIR/ms`).
A run is identified by its config name (overlock_{xt,t,s,b}.yaml, overlock_{t,s,b}_maskrcnn_{1x,3x}.py,
overlock_{t,s,b}_cascade_maskrcnn_3x.py, overlock_{t,s,b}_upernet*.py), taken from results.json ('config',
'model', 'arch'), the config file dumped into the work dir, or the work dir's name.

Usage: python tools/collect_results.py work_dirs [more dirs] --out outputs/results [--complexity c.json]
"""
import argparse
import csv
import io
import json
import re
from pathlib import Path

# Paper numbers (the authors' README). Cascade Mask R-CNN and multi-scale mIoU are not reproduced here: shown as '-'.
PAPER_CLS = {'xt': (82.7, 16, 2.6), 't': (84.2, 33, 5.5), 's': (84.8, 56, 9.7), 'b': (85.1, 95, 16.7)}
PAPER_DET = {('t', 'maskrcnn', '1x'): (48.3, 43.3), ('t', 'maskrcnn', '3x'): (49.6, 43.9),
             ('s', 'maskrcnn', '1x'): (49.4, 44.0), ('s', 'maskrcnn', '3x'): (51.0, 45.0),
             ('b', 'maskrcnn', '1x'): (49.9, 44.4), ('b', 'maskrcnn', '3x'): (51.4, 45.3)}
PAPER_SEG = {'t': 50.3, 's': 51.3, 'b': 51.7}
VARIANT_NAMES = {'xt': 'OverLoCK-XT', 't': 'OverLoCK-T', 's': 'OverLoCK-S', 'b': 'OverLoCK-B',
                 'test': 'test_overlock'}

_NAME_RE = re.compile(r'(?:^|[^a-z])overlock_(xt|t|s|b)(?![a-z])(?:_(cascade_maskrcnn|maskrcnn|upernet))?'
                      r'(?:_(1x|3x))?')


def identify(*names):
    """(variant, detector, schedule) from the first name that matches a paper config or the test model."""
    for name in names:
        if not name:
            continue
        name = Path(str(name)).name.lower().replace('-', '_')
        m = _NAME_RE.search(name)
        if m:
            return m.group(1), m.group(2), m.group(3)
        if 'test_overlock' in name or name.startswith('demo'):  # the demo configs use test_overlock
            return 'test', None, None
    return None, None, None


def _load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path):
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def latest_scalars(workdir):
    """Rows of the newest `<timestamp>/vis_data/scalars.json` in an mmengine work dir (empty if none)."""
    files = sorted(Path(workdir).glob('*/vis_data/scalars.json'), key=lambda p: p.parent.parent.name)
    # Test-only runs write a scalars.json with just the metrics; prefer the newest one that has any.
    for f in reversed(files):
        rows = _jsonl(f)
        if rows:
            return rows
    return []


def latest_train_scalars(workdir):
    """Rows of the newest scalars.json that logged a training loss (a later test-only run has none)."""
    files = sorted(Path(workdir).glob('*/vis_data/scalars.json'), key=lambda p: p.parent.parent.name)
    for f in reversed(files):
        rows = _jsonl(f)
        if any('loss' in r for r in rows):
            return rows
    return []


def _last(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def _best(rows, key):
    """(best value, its epoch/step) over the rows that have ``key``."""
    vals = [(r[key], r.get('epoch', r.get('step'))) for r in rows if r.get(key) is not None]
    return max(vals, key=lambda t: t[0]) if vals else (None, None)


def _cls_figure(res, log):
    """Which top-1 a classification row reports, and the run's other figures beside it."""
    if res.get('checkpoint'):  # classification/validate.py
        return f"{res.get('figure', 'checkpoint evaluation')}: {Path(res['checkpoint']).name}"
    best = res.get('best') or {}
    if res:
        text = 'last epoch'
        if best.get('top1', -1) >= 0:
            text += f"; best {best['top1']:.1f} @ epoch {best['epoch']}"
        if res.get('ema_top1') is not None:
            text += f"; EMA last {res['ema_top1']:.1f}"
            if best.get('ema_top1', -1) >= 0:
                text += f", best {best['ema_top1']:.1f} @ epoch {best['ema_epoch']}"
        return text
    b, e = _best(log, 'top1')
    return 'last logged epoch (unfinished run)' + (f'; best {b:.1f} @ epoch {e}' if b is not None else '')


def _dense_figure(res, scalars, key, scale):
    """Which AP / mIoU a det/seg row reports: a checkpoint's test, or the last validation of a training run."""
    if res.get('checkpoint'):
        return f"test of {Path(res['checkpoint']).name}"
    if not scalars:
        return '-'
    b, step = _best(scalars, key)
    return 'last validation' + (f'; best {scale * b:.1f} @ {step}' if b is not None else '')


def _to_m(v):
    return None if v is None else (v / 1e6 if v > 1e4 else float(v))


def _to_g(v):
    return None if v is None else (v / 1e9 if v > 1e4 else float(v))


def _cls_model_name(path):
    try:
        import yaml
        return (yaml.safe_load(Path(path).read_text()) or {}).get('model', {}).get('name')
    except (OSError, ImportError, ValueError, AttributeError):
        return None


def is_run_dir(d):
    d = Path(d)
    return any((d / f).is_file() for f in ('results.json', 'log.jsonl', 'sweep_cell.json')) or \
        any(d.glob('*/vis_data/scalars.json'))


def read_run(workdir):
    """One record per work dir: task, identity, metrics (percent), params (M), FLOPs (G), sweep overrides."""
    wd = Path(workdir)
    res = _load_json(wd / 'results.json') or {}
    # Multi-scale (tools/test.py --tta) results: results_ms.json, or a results.json with "tta": true in a sub-dir.
    res_ms = _load_json(wd / 'results_ms.json') or next(
        (r for r in map(_load_json, sorted(wd.glob('*/results.json'))) if r and r.get('tta')), {})
    cell = _load_json(wd / 'sweep_cell.json') or {}
    log = _jsonl(wd / 'log.jsonl')
    scalars = latest_scalars(wd)
    dumped = sorted(p.name for p in wd.glob('*.py')) + sorted(p.name for p in wd.glob('*.yaml'))
    cfg_name = res.get('config') or cell.get('config')
    cls_model = _cls_model_name(wd / 'config.yaml')  # classification's effective config: model.name
    variant, detector, schedule = identify(cfg_name, res.get('model'), res.get('arch'), cls_model, *dumped,
                                           wd.name)
    if res.get('arch') and variant is None:
        variant = str(res['arch']).lower()
    detector = res.get('detector', detector)
    schedule = res.get('schedule', schedule)

    task = res.get('task')
    if task is None:
        if log or (wd / 'config.yaml').is_file():
            task = 'cls'
        elif any('coco/bbox_mAP' in r for r in scalars) or detector in ('maskrcnn', 'cascade_maskrcnn'):
            task = 'det'
        elif any('mIoU' in r for r in scalars) or detector == 'upernet':
            task = 'seg'
    rec = dict(work_dir=str(wd), task=task, variant=variant, config=cfg_name or (dumped[0] if dumped else None),
               detector=detector, schedule=schedule, overrides=cell.get('overrides'),
               returncode=cell.get('returncode'), metrics={})
    met = rec['metrics']
    if task == 'cls':
        top1 = res.get('top1')
        if top1 is None and log:
            top1 = _last(log, 'top1')
        rec['figure'] = _cls_figure(res, log)
        met.update(top1=top1, top5=res.get('top5', _last(log, 'top5')),
                   epochs=res.get('epochs', _last(log, 'epoch')))
        rec['params_m'] = _to_m(res.get('params'))
        rec['gflops'] = _to_g(res.get('flops', res.get('gflops')))
    elif task == 'det':
        bbox, segm = res.get('bbox_mAP'), res.get('segm_mAP')
        if bbox is None and _last(scalars, 'coco/bbox_mAP') is not None:
            bbox = 100 * _last(scalars, 'coco/bbox_mAP')  # mmdet logs fractions
        if segm is None and _last(scalars, 'coco/segm_mAP') is not None:
            segm = 100 * _last(scalars, 'coco/segm_mAP')
        met.update(bbox_mAP=bbox, segm_mAP=segm)
        rec['figure'] = _dense_figure(res, scalars, 'coco/bbox_mAP', 100)
    elif task == 'seg':
        ms = bool(res.get('aug_test') or res.get('tta') or res.get('mode') == 'ms')
        miou = res.get('mIoU', _last(scalars, 'mIoU'))  # mmseg logs percentages
        met.update(mIoU=None if ms else miou, mIoU_ms=res.get('mIoU_ms', res_ms.get('mIoU', miou if ms else None)),
                   aAcc=res.get('aAcc', _last(scalars, 'aAcc')))
        rec['figure'] = _dense_figure(res, scalars, 'mIoU', 1)
    return rec


def find_runs(paths):
    """Work dirs under the given paths (a run dir's own sub-dirs are not searched further)."""
    runs, stack = [], [Path(p) for p in paths]
    while stack:
        d = stack.pop(0)
        if not d.is_dir():
            continue
        if is_run_dir(d):
            runs.append(read_run(d))
            continue
        stack.extend(sorted(c for c in d.iterdir() if c.is_dir()))
    return runs


def _f(v, nd=1):
    return '-' if v is None else f'{v:.{nd}f}'


def _d(ours, paper):
    return '-' if ours is None or paper is None else f'{ours - paper:+.1f}'


def build_tables(runs, complexity=None, paper_rows=True):
    """Dict table-name -> (header, rows). Paper variants without a run get a row with our numbers '-'."""
    complexity = complexity or {}
    main_runs = [r for r in runs if r['overrides'] is None]  # sweep cells only appear in the sweep table
    t = {}
    rows, seen = [], set()
    for r in (r for r in main_runs if r['task'] == 'cls'):
        v = r['variant']
        seen.add(v)
        p1, pp, pf = PAPER_CLS.get(v, (None, None, None))
        cx = complexity.get(v, {})
        params = r.get('params_m') or cx.get('params_m')
        flops = r.get('gflops') or cx.get('gflops')
        rows.append([VARIANT_NAMES.get(v, v or '?'), _f(r['metrics']['top1']), _f(p1), _d(r['metrics']['top1'], p1),
                     _f(params), _f(pp, 0), _f(flops), _f(pf), r.get('figure', '-'), r['work_dir']])
    if paper_rows:
        for v, (p1, pp, pf) in PAPER_CLS.items():
            if v not in seen:
                cx = complexity.get(v, {})
                rows.append([VARIANT_NAMES[v], '-', _f(p1), '-', _f(cx.get('params_m')), _f(pp, 0),
                             _f(cx.get('gflops')), _f(pf), '-', ''])
    t['cls'] = (['Model', 'Top-1', 'Top-1 (paper)', 'diff', 'Params (M)', 'Params (paper)', 'FLOPs (G)',
                 'FLOPs (paper)', 'Figure', 'work dir'], rows)

    rows, seen = [], set()
    for r in (r for r in main_runs if r['task'] == 'det'):
        key = (r['variant'], r['detector'] or 'maskrcnn', r['schedule'])
        seen.add(key)
        pb, pm = PAPER_DET.get(key, (None, None))
        b, m = r['metrics']['bbox_mAP'], r['metrics']['segm_mAP']
        rows.append([VARIANT_NAMES.get(key[0], key[0] or '?'), _det_name(key[1]), key[2] or '-', _f(b), _f(pb),
                     _d(b, pb), _f(m), _f(pm), _d(m, pm), r.get('figure', '-'), r['work_dir']])
    if paper_rows:
        for key, (pb, pm) in PAPER_DET.items():
            if key not in seen:
                rows.append([VARIANT_NAMES[key[0]], _det_name(key[1]), key[2], '-', _f(pb), '-', '-', _f(pm), '-',
                             '-', ''])
    t['det'] = (['Backbone', 'Detector', 'Schedule', 'AP^b', 'AP^b (paper)', 'diff', 'AP^m', 'AP^m (paper)',
                 'diff', 'Figure', 'work dir'], rows)

    rows, seen = [], set()
    for r in (r for r in main_runs if r['task'] == 'seg'):
        v = r['variant']
        seen.add(v)
        p = PAPER_SEG.get(v)
        ss, ms = r['metrics']['mIoU'], r['metrics']['mIoU_ms']
        rows.append([VARIANT_NAMES.get(v, v or '?'), 'UperNet', _f(ss), _f(p), _d(ss, p), _f(ms), '-',
                     r.get('figure', '-'), r['work_dir']])
    if paper_rows:
        for v, p in PAPER_SEG.items():
            if v not in seen:
                rows.append([VARIANT_NAMES[v], 'UperNet', '-', _f(p), '-', '-', '-', '-', ''])
    t['seg'] = (['Backbone', 'Method', 'mIoU SS', 'mIoU SS (paper)', 'diff', 'mIoU MS', 'mIoU MS (paper)',
                 'Figure', 'work dir'], rows)

    rows = []
    for r in (r for r in runs if r['overrides'] is not None):
        m = r['metrics']
        main = next(((k, m[k]) for k in ('top1', 'bbox_mAP', 'mIoU') if m.get(k) is not None), ('-', None))
        extra = m.get('segm_mAP') if r['task'] == 'det' else None
        rc = r.get('returncode')
        status = 'running / not run' if rc is None else ('ok' if rc == 0 else f'failed (exit {rc})')
        rows.append([Path(r['work_dir']).name, r['task'] or '?',
                     ' '.join(f'{k}={_compact(v)}' for k, v in r['overrides'].items()), status, main[0],
                     _f(main[1]), _f(extra), r['work_dir']])
    t['sweep'] = (['Cell', 'Task', 'Overrides', 'Status', 'Metric', 'Value', 'AP^m', 'work dir'], rows)
    return t


def _compact(v):
    """An override value as typed on the command line: [7,7,7,7], true, static."""
    return v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))


def _det_name(d):
    return {'maskrcnn': 'Mask R-CNN', 'cascade_maskrcnn': 'Cascade Mask R-CNN'}.get(d, d or '-')


TITLES = {'cls': 'ImageNet-1K classification (224x224, single crop)',
          'det': 'COCO detection and instance segmentation',
          'seg': 'ADE20K semantic segmentation (UperNet, 512x512)',
          'sweep': 'Sweep cells'}


def to_markdown(tables, skip_empty_sweep=True):
    out = io.StringIO()
    for name, (header, rows) in tables.items():
        if name == 'sweep' and not rows and skip_empty_sweep:
            continue
        out.write(f'## {TITLES[name]}\n\n| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header) + '\n')
        for row in rows:
            out.write('| ' + ' | '.join(str(c) for c in row) + ' |\n')
        out.write('\n')
    return out.getvalue()


def load_complexity(path):
    """Map variant -> {params_m, gflops, ...} from `tools/complexity.py --json` ({"variants": [rows]}).

    params_m / gflops are the deploy (re-parameterised, no aux head) params and MACs, the paper's convention for
    params; gflops_train and gflops_paper_conv (training form without the lk_origin convs, the paper's convention)
    are kept too.
    Older/other layouts (a dict or list keyed by variant with params/flops fields) are accepted as well.
    """
    data = _load_json(path) if path else None
    if not data:
        return {}
    if isinstance(data, dict) and isinstance(data.get('variants'), list):
        data = data['variants']
    items = data.items() if isinstance(data, dict) else ((d.get('variant') or d.get('arch') or d.get('model'), d)
                                                          for d in data if isinstance(d, dict))
    out = {}
    for name, d in items:
        if not isinstance(d, dict):
            continue
        v = identify(f'overlock_{name}' if name in PAPER_CLS else name)[0] or str(name).lower()
        params = d.get('params_m', _to_m(d.get('params_deploy', d.get('params'))))
        flops = d.get('gflops', d.get('gmacs_deploy', _to_g(d.get('flops', d.get('macs')))))
        out[v] = dict(params_m=params, gflops=flops, params_train_m=_to_m(d.get('params_train')),
                      gflops_train=d.get('gmacs_train'), gflops_paper_conv=d.get('gmacs_paper_convention'))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', default=['work_dirs'], help='work dirs or folders of work dirs')
    p.add_argument('--out', default=None, help='write results.md and results_{cls,det,seg,sweep}.csv here')
    p.add_argument('--complexity', default=None, help='JSON from tools/complexity.py --json (fills params/FLOPs)')
    p.add_argument('--only-runs', action='store_true', help='omit paper rows that have no run')
    args = p.parse_args(argv)
    runs = find_runs(args.paths)
    tables = build_tables(runs, load_complexity(args.complexity), paper_rows=not args.only_runs)
    md = '# Results\n\n' + to_markdown(tables)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'results.md').write_text(md)
        for name, (header, rows) in tables.items():
            with open(out / f'results_{name}.csv', 'w', newline='') as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
        print(f'[collect_results] {len(runs)} run(s) -> {out}/results.md, results_*.csv')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
