#!/usr/bin/env python
"""`make demo`: generate the embedded demo data, train + test the three demo configs, and write a report.

Why: one command that exercises the real pipelines end to end (the same launchers, configs and metrics as a
full run, only on `test_overlock` and tiny synthetic data), and leaves a readable artefact behind:
outputs/demo/report.md with the complexity table next to the paper's numbers, the demo metrics, training
curves and prediction images. `--quick` shortens every training run (a few minutes of training in total).

Stages: data, complexity (cached while the model code is unchanged), {cls,det,seg}-train, {cls,det,seg}-test,
{cls,det,seg}-curves, {det,seg}-predict, report. A failing stage is reported by name, the remaining independent
stages still run, and the exit status is 1. Logs: <out>/logs/<stage>.log.

Usage: python tools/demo.py [--quick] [--only cls,det,seg] [--skip-data] [--out outputs/demo]
       python tools/demo.py --only none --skip-data     # only rebuild the report from the existing work dirs
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / 'tools'), str(ROOT)]  # ROOT: custom_imports of the mm configs (as tools/dist_*.sh)
import collect_results  # noqa: E402
import make_demo_data  # noqa: E402

TASKS = {  # config, default work dir name (contract: work_dirs/<config name>), metrics shown in the report
    'cls': ('configs/cls/demo.yaml', 'demo', ('top1', 'top5')),
    'det': ('configs/det/demo_maskrcnn.py', 'demo_maskrcnn', ('bbox_mAP', 'segm_mAP')),
    'seg': ('configs/seg/demo_upernet.py', 'demo_upernet', ('mIoU', 'aAcc')),
}
# --quick: enough steps to see the loss fall and to produce every artefact, a fraction of the full demo's time.
QUICK = {
    'cls': ['train.epochs=2', 'train.steps_per_epoch=6', 'train.warmup_epochs=0', 'train.cooldown_epochs=0'],
    'det': ['train_cfg.max_epochs=1', 'default_hooks.logger.interval=2'],
    'seg': ['train_cfg.max_iters=40', 'train_cfg.val_interval=40', 'default_hooks.checkpoint.interval=40',
            'default_hooks.logger.interval=5'],
}
METRIC_NAMES = {'top1': 'Top-1 (%, last epoch)', 'top5': 'Top-5 (%)', 'bbox_mAP': 'AP^b', 'segm_mAP': 'AP^m', 'mIoU': 'mIoU',
                'aAcc': 'aAcc (%)'}
SHAPES = make_demo_data.SHAPE_CLASSES
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200)]  # RGB per shape class
SEG_CLASSES = make_demo_data.SEG_CLASSES  # label-map values 0..3, background first
SEG_COLOURS = [(0, 0, 0)] + COLOURS  # RGB per segmentation class (configs/seg/demo_upernet.py's palette)
IGNORE_COLOUR = (255, 255, 255)  # label 255 (ignored) and any value outside the classes


def data_overrides(task, data):
    """cfg-options pointing a demo config at the data root (tools/train.py and test.py rewrite every data_root)."""
    return [f'data.data_dir={data}/cls'] if task == 'cls' else \
        [f'data_root={data}/{"coco" if task == "det" else "ade"}/']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.logs = self.out / 'logs'
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stages = []  # (name, status, seconds, log path or note)
        self.failed = []

    def record(self, name, ok, seconds, note=''):
        self.stages.append((name, 'ok' if ok else 'FAILED', seconds, note))
        if not ok:
            self.failed.append(name)
        print(f'[demo] {name}: {"ok" if ok else "FAILED"} ({seconds:.0f}s){"  " + note if note else ""}', flush=True)
        return ok

    def run(self, name, cmd):
        """Run one stage as a subprocess in the repo root; its output goes to logs/<name>.log."""
        log = self.logs / f'{name}.log'
        print(f'[demo] {name}: {shlex.join(cmd)}', flush=True)
        env = dict(os.environ, PORT=str(free_port()), PYTHONUNBUFFERED='1')
        t0 = time.time()
        with open(log, 'w') as f:
            f.write(f'$ {shlex.join(cmd)}\n')
            f.flush()
            # Own process group, so a timeout also ends torchrun's workers.
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=self.args.stage_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                rc = f'timeout after {self.args.stage_timeout}s'
        ok = rc == 0
        if not ok:
            tail = log.read_text(errors='replace').splitlines()[-25:]
            print('\n'.join(f'    | {line}' for line in tail), file=sys.stderr)
        return self.record(name, ok, time.time() - t0, str(log.relative_to(self.out)) +
                           ('' if ok else f' (exit {rc})'))

    def step(self, name, fn, *a):
        """Run an in-process stage, turning an exception into a failed stage."""
        t0 = time.time()
        try:
            res = fn(*a)
            self.record(name, True, time.time() - t0)
            return res
        except Exception as e:  # noqa: BLE001 - a demo stage must not take the others down
            import traceback
            (self.logs / f'{name}.log').write_text(traceback.format_exc())
            self.record(name, False, time.time() - t0, f'{type(e).__name__}: {e}'[:200])
            return None


# ---------------------------------------------------------------- pipeline stages
def ensure_data(data, force=False):
    need = [Path(data) / 'cls' / 'val', Path(data) / 'coco/annotations/instances_val.json',
            Path(data) / 'ade/annotations/validation']
    stale = any(p.exists() and p.stat().st_mtime < Path(make_demo_data.__file__).stat().st_mtime for p in need)
    if force or stale or not all(p.exists() for p in need):  # regenerate when the generator changed
        make_demo_data.main(['--out', str(data)])
    return True


def mm_checkpoint(work_dir):
    """The checkpoint mmengine's CheckpointHook saved last (its `last_checkpoint` file), else the newest *.pth."""
    last = Path(work_dir) / 'last_checkpoint'
    if last.is_file():
        p = Path(last.read_text().strip())
        if p.is_file():
            return p
        if (ROOT / p).is_file():
            return ROOT / p
    ckpts = sorted(Path(work_dir).glob('*.pth'), key=os.path.getmtime)
    if not ckpts:
        raise FileNotFoundError(f'no checkpoint in {work_dir}')
    return ckpts[-1]


def cls_checkpoint(work_dir):
    for name in ('checkpoint-best.pth', 'checkpoint-last.pth'):
        if (Path(work_dir) / name).is_file():
            return Path(work_dir) / name
    raise FileNotFoundError(f'no checkpoint-best.pth / checkpoint-last.pth in {work_dir}')


def run_task(demo, task, work_dir):
    config, _, _ = TASKS[task]
    if not (ROOT / config).is_file():
        return demo.record(f'{task}-train', False, 0, f'{config} does not exist yet')
    opts = data_overrides(task, demo.args.data) + (QUICK[task] if demo.args.quick else [])
    shutil.rmtree(work_dir, ignore_errors=True)  # a fresh run: log.jsonl appends, old checkpoints would resume
    cfg_opts = ['--cfg-options', *opts] if opts else []
    if not demo.run(f'{task}-train', ['bash', 'tools/dist_train.sh', config, '1', '--work-dir', str(work_dir),
                                      *cfg_opts]):
        return False
    try:
        ckpt = cls_checkpoint(work_dir) if task == 'cls' else mm_checkpoint(work_dir)
    except FileNotFoundError as e:
        return demo.record(f'{task}-test', False, 0, str(e))
    # cls: evaluate the re-parameterised (deploy) model into <work dir>/eval, next to training's results.json.
    extra = ['--work-dir', str(Path(work_dir) / 'eval'), '--reparam'] if task == 'cls' else \
        ['--work-dir', str(work_dir)]
    return demo.run(f'{task}-test', ['bash', 'tools/dist_test.sh', config, str(ckpt), '1', *extra, *cfg_opts])


def run_complexity(demo):
    script = ROOT / 'tools' / 'complexity.py'
    if not script.is_file():
        demo.stages.append(('complexity', 'skipped', 0, 'tools/complexity.py not present yet'))
        return None
    out = demo.out / 'complexity.json'
    sources = [script, *(ROOT / 'overlock_core' / 'models').glob('*.py')]
    if out.is_file() and out.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        demo.stages.append(('complexity', 'cached', 0, f'{out.name} is newer than the model code'))
        return collect_results.load_complexity(out)
    if demo.run('complexity', [sys.executable, 'tools/complexity.py', '--json', str(out.resolve())]):
        return collect_results.load_complexity(out)
    return None


# ---------------------------------------------------------------- report pieces
def plot_curves(task, work_dir, out_png):
    """Loss and validation metric against step/epoch; returns the PNG path or None if there is nothing yet."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    wd = Path(work_dir)
    if task == 'cls':
        rows = collect_results._jsonl(wd / 'log.jsonl')
        loss = [(r['epoch'], r['train_loss']) for r in rows if r.get('train_loss') is not None]
        val_loss = [(r['epoch'], r['val_loss']) for r in rows if r.get('val_loss') is not None]
        mets = {k: [(r['epoch'], r[k]) for r in rows if r.get(k) is not None] for k in ('top1', 'ema_top1')}
        xlabel = 'epoch'
    else:
        rows = collect_results.latest_train_scalars(wd)
        loss = [(r.get('iter', r.get('step')), r['loss']) for r in rows if 'loss' in r]
        keys = ('coco/bbox_mAP', 'coco/segm_mAP') if task == 'det' else ('mIoU',)
        mets = {k: [(r['step'], r[k] * (100 if task == 'det' else 1)) for r in rows if k in r] for k in keys}
        val_loss = []
        xlabel = 'iteration'
    if not loss and not any(mets.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if loss:
        axes[0].plot(*zip(*loss), lw=1.2, label='train')
    if val_loss:
        axes[0].plot(*zip(*val_loss), lw=1.2, label='val')
        axes[0].legend(fontsize=8)
    axes[0].set(title=f'{task}: training loss', xlabel=xlabel, ylabel='loss')
    for k, v in mets.items():
        if v:
            axes[1].plot(*zip(*v), marker='o', label=k)
    axes[1].set(title=f'{task}: validation', xlabel='epoch' if task != 'seg' else 'iteration', ylabel='%')
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _val_images(data, task, n):
    d = Path(data) / ('coco/val' if task == 'det' else 'ade/images/validation')
    return sorted(d.glob('*.png' if task == 'det' else '*.jpg'))[:n]


def _grid(images, out_png):
    import numpy as np
    from PIL import Image
    h = max(i.shape[0] for i in images)
    row = np.concatenate([np.pad(i, ((0, h - i.shape[0]), (0, 4), (0, 0)), constant_values=255) for i in images], 1)
    Image.fromarray(row).save(out_png)
    return out_png


def predict_det(config, ckpt, data, out_png, n=4, thr=0.3):
    """Boxes, masks and labels of the trained demo detector on a few val images (CPU)."""
    import cv2
    import numpy as np
    from mmdet.apis import inference_detector, init_detector

    from overlock_core.mm import mmengine_checkpoint_globals
    with mmengine_checkpoint_globals():  # a Runner checkpoint, read with torch.load(weights_only=True)
        model = init_detector(str(ROOT / config), str(ckpt), device='cpu')
    tiles = []
    for f in _val_images(data, 'det', n):
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        inst = inference_detector(model, str(f)).pred_instances
        keep = inst.scores > thr
        vis = img.astype(np.float32)
        masks = inst.masks[keep].cpu().numpy() if 'masks' in inst else []
        for m, lab in zip(masks, inst.labels[keep].tolist()):
            vis[m.astype(bool)] = 0.5 * vis[m.astype(bool)] + 0.5 * np.array(COLOURS[lab % 3])
        vis = cv2.resize(vis.clip(0, 255).astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        for box, lab, s in zip(inst.bboxes[keep].tolist(), inst.labels[keep].tolist(), inst.scores[keep].tolist()):
            x0, y0, x1, y1 = (int(2 * v) for v in box)
            cv2.rectangle(vis, (x0, y0), (x1, y1), COLOURS[lab % 3], 2)
            cv2.putText(vis, f'{SHAPES[lab % 3]} {s:.2f}', (x0, max(y0 - 3, 9)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(vis)
    return _grid(tiles, out_png)


def colour_labels(labels, colours=SEG_COLOURS):
    """RGB picture of a label map: value i in ``colours[i]``, anything else (255 = ignored) in IGNORE_COLOUR."""
    import numpy as np
    lut = np.array(list(colours) + [IGNORE_COLOUR] * (256 - len(colours)), np.uint8)
    return lut[np.clip(np.asarray(labels).astype(np.int64), 0, 255)]


def predict_seg(config, ckpt, data, out_png, n=4):
    """Image / ground truth / prediction of the trained demo segmentor on a few val images (CPU).

    Ground truth and prediction use the same classes and colours (background included), so the picture shows what
    the mIoU scores.
    """
    import cv2
    import numpy as np
    from PIL import Image
    from mmseg.apis import inference_model, init_model

    from overlock_core.mm import mmengine_checkpoint_globals
    with mmengine_checkpoint_globals():  # a Runner checkpoint, read with torch.load(weights_only=True)
        model = init_model(str(ROOT / config), str(ckpt), device='cpu')
    classes = tuple(model.dataset_meta['classes'])
    if classes != SEG_CLASSES or model.decode_head.num_classes != len(SEG_CLASSES):
        raise ValueError(f'{config} predicts {model.decode_head.num_classes} classes {classes}; the demo data has '
                         f'{SEG_CLASSES} (label values 0..{len(SEG_CLASSES) - 1})')
    rows = []
    for f in _val_images(data, 'seg', n):
        img = np.asarray(Image.open(f).convert('RGB'), np.uint8)
        gt = np.asarray(Image.open(Path(data) / 'ade/annotations/validation' / f'{f.stem}.png'))
        pred = inference_model(model, str(f)).pred_sem_seg.data[0].cpu().numpy()  # class index = label value
        rows.append(np.concatenate([img, colour_labels(gt), colour_labels(pred)], 1))  # image, GT, prediction
    grid = np.concatenate([np.pad(r, ((0, 4), (0, 0), (0, 0)), constant_values=255) for r in rows], 0)
    grid = cv2.resize(grid, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_NEAREST)
    legend = np.full((22, grid.shape[1], 3), 255, np.uint8)
    x = 8
    for name, colour in zip(SEG_CLASSES, SEG_COLOURS):
        cv2.rectangle(legend, (x, 5), (x + 12, 17), colour, -1)
        cv2.rectangle(legend, (x, 5), (x + 12, 17), (128, 128, 128), 1)
        cv2.putText(legend, name, (x + 16, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x += 24 + 9 * len(name)
    grid = np.concatenate([legend, grid], 0)
    Image.fromarray(grid).save(out_png)
    return out_png


def complexity_table(cx):
    if cx is None:
        return ('_Hook:_ `tools/complexity.py --json FILE` was not available (or failed) when this report was '
                'written; rerun `python tools/demo.py --only none` once it exists to fill this table. '
                'Paper numbers: Params 16/33/56/95 M, FLOPs 2.6/5.5/9.7/16.7 G for XT/T/S/B.\n')
    f = collect_results._f
    lines = ['| Model | Params deploy (M) | Params train (M) | Params (paper) | GMACs deploy | GMACs train | '
             'GMACs paper convention | FLOPs (paper) |', '|---|---|---|---|---|---|---|---|']
    for v, c in cx.items():
        _, pp, pf = collect_results.PAPER_CLS.get(v, (None, '-', '-'))
        lines.append(f'| {collect_results.VARIANT_NAMES.get(v, v)} | {f(c.get("params_m"), 2)} | '
                     f'{f(c.get("params_train_m"), 2)} | {pp} | {f(c.get("gflops"), 2)} | '
                     f'{f(c.get("gflops_train"), 2)} | {f(c.get("gflops_paper_conv"), 2)} | {pf} |')
    return '\n'.join(lines) + ('\n\nMACs at 224x224 from `tools/complexity.py` (FlopCounterMode + exact ContMix '
                               'aggregation). "Paper convention" leaves out the large-kernel `lk_origin` convs, '
                               'which the authors\' counter did not see; deploy params exclude the aux '
                               'head, as the paper\'s do.\n')


def write_report(demo, work_dirs, cx, images, t_start):
    out = demo.out
    md = [f'# OverLoCK demo report\n',
          f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} · mode: {demo.mode} · '
          f'{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()} · '
          f'total {time.time() - t_start:.0f} s\n',
          'The demo trains `test_overlock` (one block per stage) on the synthetic shapes data of '
          '`tools/make_demo_data.py`, through the same launchers, configs and metrics as a full run. Its numbers '
          'show that the pipelines work end to end; they are not comparable with the paper\'s.\n',
          '## Stages\n', '| Stage | Status | Time (s) | Log / note |', '|---|---|---|---|']
    md += [f'| {n} | {s} | {t:.0f} | {note} |' for n, s, t, note in demo.stages]
    md += ['', '## Model complexity (ImageNet variants) vs. the paper\n', complexity_table(cx),
           '## Demo results\n', '| Task | Config | Metric | Value | Work dir |', '|---|---|---|---|---|']
    for task, wd in work_dirs.items():
        rec = collect_results.read_run(wd) if Path(wd).is_dir() else {'metrics': {}}
        for k in TASKS[task][2]:
            md.append(f'| {task} | `{TASKS[task][0]}` | {METRIC_NAMES[k]} | '
                      f'{collect_results._f(rec["metrics"].get(k), 2)} | `{wd}` |')
        deploy = collect_results._load_json(Path(wd) / 'eval' / 'results.json') if task == 'cls' else None
        if deploy:
            md.append(f'| cls | `{TASKS[task][0]}` | Top-1 (%), best checkpoint re-parameterised | '
                      f'{collect_results._f(deploy.get("top1"), 2)} | `{wd}/eval` |')
    md.append('')
    for title, key in (('Training curves', 'curves'), ('Predictions', 'pred')):
        pics = [(t, p) for (t, k), p in images.items() if k == key and p]
        if pics:
            md.append(f'## {title}\n')
            for t, p in pics:
                md.append(f'**{t}**\n\n![{t} {key}]({Path(p).relative_to(out)})\n')
    if any(k == 'pred' and t == 'seg' for t, k in images):
        md.append('Segmentation panels: image / ground truth / prediction, in the legend\'s colours. Background '
                  f'(black) is one of the {len(SEG_CLASSES)} classes the model predicts and the mIoU averages.\n')
    md += ['## Reproduce\n', '```', f'python tools/demo.py{" --quick" if demo.mode == "quick" else ""}',
           'python tools/collect_results.py work_dirs --out outputs/results', '```', '']
    (out / 'report.md').write_text('\n'.join(md))
    return out / 'report.md'


def merge_previous_stages(demo, tasks):
    """Keep the earlier runs' train/test rows (and mode) for tasks not re-run now, e.g. after `--only det`."""
    path = demo.out / 'stages.json'
    prev = collect_results._load_json(path) or {}
    now = {n for n, *_ in demo.stages}
    kept = [tuple(r) for r in prev.get('stages', []) if r[0].split('-')[0] in TASKS and
            r[0].split('-')[0] not in tasks and r[0] not in now and r[0].split('-')[1] in ('train', 'test')]
    demo.stages = kept + demo.stages
    demo.mode = ('quick' if demo.args.quick else 'full') if tasks else prev.get('mode', 'full')
    path.write_text(json.dumps(dict(mode=demo.mode, stages=demo.stages), indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='reduced epochs/iterations (tests, smoke checks)')
    p.add_argument('--only', default='cls,det,seg', help="tasks to train/test: subset of cls,det,seg or 'none'")
    p.add_argument('--skip-data', action='store_true', help='do not generate demo data (must already exist)')
    p.add_argument('--skip-complexity', action='store_true', help='do not run tools/complexity.py')
    p.add_argument('--data', default='demo_data', help='demo data root (relative to the repo root)')
    p.add_argument('--out', default='outputs/demo', help='report folder')
    p.add_argument('--work-root', default='work_dirs', help='work dirs: WORK_ROOT/{demo,demo_maskrcnn,demo_upernet} (re-created by each run)')
    p.add_argument('--stage-timeout', type=int, default=1200, help='seconds before a stage is killed')
    args = p.parse_args(argv)
    os.chdir(ROOT)
    tasks = [t for t in args.only.split(',') if t and t != 'none']
    if unknown := set(tasks) - set(TASKS):
        p.error(f'--only: unknown task(s) {sorted(unknown)}; choose from cls,det,seg')
    t_start, demo = time.time(), Demo(args)
    demo.out.mkdir(parents=True, exist_ok=True)
    # Reports cover every demo work dir that exists, so `--only none` refreshes the report of earlier runs.
    work_dirs = {t: str(Path(args.work_root) / TASKS[t][1]) for t in TASKS}
    work_dirs = {t: wd for t, wd in work_dirs.items() if t in tasks or Path(wd).is_dir()}

    if args.skip_data:
        demo.stages.append(('data', 'skipped', 0, f'--skip-data ({args.data})'))
    else:
        demo.step('data', ensure_data, args.data)
    cx = run_complexity(demo) if not args.skip_complexity else \
        collect_results.load_complexity(demo.out / 'complexity.json') or None  # reuse an earlier run's table
    for t in tasks:
        run_task(demo, t, work_dirs[t])

    images = {}
    for t, wd in work_dirs.items():
        images[(t, 'curves')] = demo.step(f'{t}-curves', plot_curves, t, wd, demo.out / f'curves_{t}.png')
        if t == 'cls' or any(s.startswith(t + '-') for s in demo.failed):
            continue
        try:
            ckpt = mm_checkpoint(wd)
        except FileNotFoundError:
            continue
        fn = predict_det if t == 'det' else predict_seg
        images[(t, 'pred')] = demo.step(f'{t}-predict', fn, TASKS[t][0], ckpt, args.data, demo.out / f'pred_{t}.png')
    merge_previous_stages(demo, tasks)
    report = demo.step('report', write_report, demo, work_dirs, cx, images, t_start)
    print(f'[demo] done: {report}  ({time.time() - t_start:.0f}s)')
    if demo.failed:
        print(f'[demo] FAILED stage(s): {", ".join(demo.failed)} (logs in {demo.logs})', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
