#!/usr/bin/env python
"""Speed and memory of OverLoCK against timm peers, in one run, plus the ContMix aggregation operator alone.

Every measurement runs in a fresh worker process (so peak memory is that measurement's alone), ``--repeats`` times
with the models alternating; each figure is the median over those processes of each process's median step time
(the spread column is (max - min) / median over the processes). CPU peak memory is the rise of the resident set
(VmHWM, reset through /proc/self/clear_refs) over all steps above the state after the model and input were built
(measured before the first step: glibc keeps much of a step's memory afterwards, and a baseline taken then hides a
varying part of the peak); CUDA peak memory is torch.cuda.max_memory_allocated above the same point.
  infer: eval, no grad, deploy (re-parameterised) form for OverLoCK;  train: forward + backward, training form
  (OverLoCK's memory-lean form unless --no-lean; lean=True for classifiers, 'max' with --backbone).

  python tools/benchmark.py                                   # 224x224, batch 8, CPU, 2 threads
  python tools/benchmark.py --size 800 1280 --batch 1 --modes train --backbone
  python tools/benchmark.py --modes train --no-lean           # OverLoCK through the plain modules (no recompute)
  python tools/benchmark.py --modes train --lean-max          # lean='max': no hidden MLP map kept
  python tools/benchmark.py --ops                             # aggregation operator vs the unfold formulation
  python tools/benchmark.py --device cuda --dtype bf16 --channels-last --json bench.json
  python tools/benchmark.py --models overlock_t --modes train --repeats 1 --profile 20   # where a step's time goes
  python tools/benchmark.py --compile --device cuda          # both models through torch.compile (slow to compile on CPU)
  python tools/benchmark.py --models overlock_t convnext_tiny --modes train --paired 10   # plus ratios from one process
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

# this checkout's overlock_core, in the workers too, ahead of an installed one: comparing two checkouts (git
# worktrees) would otherwise time the installed package twice
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_MODELS = ['overlock_t', 'convnext_tiny', 'overlock_s', 'convnext_small']
PEERS = (('overlock_t', 'convnext_tiny'), ('overlock_s', 'convnext_small'))  # the ratios printed
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak(device: str) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass
    return _rss_kib('VmRSS') / 1024


def _peak(device: str) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _rss_kib('VmHWM') / 1024


def _sync(device: str):
    if device == 'cuda':
        torch.cuda.synchronize()


def _time(fn, device: str, warmup: int, iters: int) -> float:
    """Median seconds per call: robust to the odd slow step of a shared machine."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _build(a: Dict):
    """(the model, one step of it on its own input) as ``a`` describes them."""
    import timm
    import overlock_core  # noqa: F401
    dev, dtype = a['device'], DTYPES[a['dtype']]
    kw = {}
    if a['backbone']:
        kw = dict(features_only=True, out_indices=(0, 1, 2, 3))
    if a.get('lean') is not None and a['model'].startswith('overlock'):  # None: the model's default
        kw['lean'] = a['lean']
    model = timm.create_model(a['model'], **kw).to(dev)
    if a.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    if a['mode'] == 'infer':
        model.eval()
        if hasattr(model, 'reparameterize') or any(hasattr(m, 'reparameterize') for m in model.modules()):
            model = timm.utils.reparameterize_model(model)
    fmt = torch.channels_last if a['channels_last'] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(a['batch'], 3, *a['size'], device=dev).to(memory_format=fmt)
    params = model
    if a.get('compile'):
        model = torch.compile(model)
    amp = torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32)

    def out_sum(out):
        if isinstance(out, (list, tuple)):
            return sum(o.float().mean() for o in out)
        return out.float().mean()

    if a['mode'] == 'infer':
        def step():
            with torch.no_grad(), amp:
                model(x)
    else:
        model.train()

        def step():
            with amp:
                loss = out_sum(model(x))
            loss.backward()
            for p in params.parameters():
                p.grad = None
    return params, step


def run_model(a: Dict) -> Dict:
    dev = a['device']
    model, step = _build(a)
    compile_s = None
    if a.get('compile'):  # the first call compiles: neither its time nor its memory is a step's
        t0 = time.perf_counter()
        step()
        _sync(dev)
        compile_s = time.perf_counter() - t0
    base = _reset_peak(dev)  # before the first step: what glibc keeps after it would hide part of the peak
    step()
    sec = _time(step, dev, a['warmup'], a['iters'])
    res = dict(seconds=sec, images_per_s=a['batch'] / sec, peak_mib=_peak(dev) - base,
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, compile_s=compile_s)
    if a.get('profile'):
        res['profile'] = _profile(step, dev, a['profile'])
    return res


def run_paired(a: Dict) -> Dict:
    """Every model of ``a['models']`` in this one process, one step each per round, the order rotating: a slow
    spell of a shared machine then hits every model alike, and the per-round ratios carry no drift between
    processes. Returns {model: [seconds of each round]} (no peak memory: the models share the heap)."""
    dev = a['device']
    steps = {m: _build(dict(a, model=m))[1] for m in a['models']}
    for step in steps.values():
        for _ in range(1 + a['warmup']):
            step()
    names, times = list(steps), {m: [] for m in steps}
    for r in range(a['rounds']):
        for m in names[r % len(names):] + names[:r % len(names)]:
            _sync(dev)
            t0 = time.perf_counter()
            steps[m]()
            _sync(dev)
            times[m].append(time.perf_counter() - t0)
    return times


def _profile(step, device: str, top: int) -> List:
    """[op, ms, calls] of the ``top`` operators by self time (device time on CUDA) over one step."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == 'cuda':
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        step()
        _sync(device)
    key = 'self_device_time_total' if device == 'cuda' else 'self_cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [[e.key, getattr(e, key) / 1e3, e.count] for e in events]


OP_SHAPES = {  # name: (heads*batch factor G, channels per head c, H, W, K) for OverLoCK-T
    'stage3@224 K13': (8, 16, 14, 14, 13), 'stage3@224 k5': (8, 16, 14, 14, 5),
    'stage4@224 K7': (16, 16, 7, 7, 7),
    'stage3@800x1280 K13': (8, 16, 50, 80, 13), 'stage4@800x1280 K7': (16, 16, 25, 40, 7),
}


def run_op(a: Dict) -> Dict:
    from overlock_core.ops import na2d_av, na2d_av_unfold
    g, c, h, w, k = OP_SHAPES[a['shape']]
    dev = a['device']
    n = a['batch'] * g
    # each formulation gets the layout it is fastest with: ours the one ContMix hands it (an (N, H, W, K*K) softmax
    # output viewed as (N, K*K, H, W)), the unfold formulation a contiguous (N, K*K, H, W) tensor
    attn = torch.randn(n, h, w, k * k, device=dev).softmax(-1).permute(0, 3, 1, 2)
    attn = (attn if a['impl'] == 'ours' else attn.contiguous()).requires_grad_()
    value = torch.randn(n, c, h, w, device=dev, requires_grad=True)
    grad = torch.randn(n, c, h, w, device=dev)
    fn = na2d_av if a['impl'] == 'ours' else na2d_av_unfold

    def step():
        out = fn(attn, value, k)
        torch.autograd.backward(out, grad)
        attn.grad = value.grad = None
    base = _reset_peak(dev)
    step()
    sec = _time(step, dev, a['warmup'], a['iters'])
    return dict(seconds=sec, peak_mib=_peak(dev) - base)


def _worker(spec: Dict) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec['threads']))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ['?']
        return dict(error=tail[0])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    ap.add_argument('--modes', nargs='+', default=['infer', 'train'], choices=['infer', 'train'])
    ap.add_argument('--size', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--dtype', default='fp32', choices=list(DTYPES))
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--backbone', action='store_true', help='features only (no classifier), as in det/seg')
    ap.add_argument('--grad-checkpointing', action='store_true',
                    help='recompute each block in the backward (timm set_grad_checkpointing): memory for time')
    lean = ap.add_mutually_exclusive_group()
    lean.add_argument('--lean', dest='lean', action='store_const', const=True, default=None,
                      help="OverLoCK with lean=True, the classifier's default (--backbone defaults to 'max')")
    lean.add_argument('--no-lean', dest='lean', action='store_const', const=False,
                      help="OverLoCK's training form through plain modules (no recomputation; more memory)")
    lean.add_argument('--lean-max', dest='lean', action='store_const', const='max',
                      help="OverLoCK with lean='max' (the MLPs keep no hidden map: less memory, more time)")
    ap.add_argument('--profile', type=int, default=0, metavar='N',
                    help='also profile one step of each model and print its N costliest operators (self time)')
    ap.add_argument('--compile', action='store_true',
                    help='torch.compile every model (inductor); the compiling first call is neither timed nor in '
                         'the peak (on the CPU the heap it leaves hides the steps\' own peak: read CUDA peaks only)')
    ap.add_argument('--cudnn-benchmark', action='store_true', help='let cuDNN pick its algorithms by timing them')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--iters', type=int, default=3)
    ap.add_argument('--repeats', type=int, default=3,
                    help='fresh processes per model and mode, alternating between models; the median is reported '
                         '(step times of one process on a shared CPU drift by 10-20%%)')
    ap.add_argument('--paired', type=int, default=0, metavar='ROUNDS',
                    help='also time all models in one process, one step each per round for ROUNDS rounds (the '
                         'order rotating): time ratios from the same rounds, free of drift between processes')
    ap.add_argument('--ops', action='store_true', help='benchmark the aggregation operator instead of models')
    ap.add_argument('--op-shapes', nargs='+', default=list(OP_SHAPES))
    ap.add_argument('--json', help='write all rows to this file')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec['threads'])
        torch.backends.cudnn.benchmark = spec.get('cudnn_benchmark', False)
        run = {'op': run_op, 'paired': run_paired}.get(spec.get('kind'), run_model)
        print(json.dumps(run(spec)))
        return
    common = dict(device=args.device, threads=args.threads, batch=args.batch, warmup=args.warmup, iters=args.iters,
                  cudnn_benchmark=args.cudnn_benchmark)
    rows: List[Dict] = []
    if args.ops:
        print(f'aggregation fwd+bwd, batch {args.batch}, {args.device}, {args.threads} threads')
        print(f"{'shape':22}{'ours ms':>10}{'unfold ms':>11}{'speed-up':>10}{'ours MiB':>10}{'unfold MiB':>12}{'mem ratio':>11}")
        for shape in args.op_shapes:
            r = {impl: _worker(dict(common, kind='op', shape=shape, impl=impl)) for impl in ('ours', 'unfold')}
            o, u = r['ours'], r['unfold']
            row = dict(shape=shape, ours=o, unfold=u)
            if 'error' not in o and 'error' not in u:
                row.update(speedup=u['seconds'] / o['seconds'], mem_ratio=u['peak_mib'] / max(o['peak_mib'], 1e-3))
                print(f"{shape:22}{o['seconds'] * 1e3:10.1f}{u['seconds'] * 1e3:11.1f}{row['speedup']:10.1f}"
                      f"{o['peak_mib']:10.1f}{u['peak_mib']:12.1f}{row['mem_ratio']:11.1f}")
            else:
                print(f'{shape:22} error: {o.get("error") or u.get("error")}')
            rows.append(row)
            sys.stdout.flush()
    else:
        h, w = args.size
        print(f"{h}x{w}, batch {args.batch}, {args.device}, {args.threads} threads, {args.dtype}"
              f"{', channels_last' if args.channels_last else ''}{', backbone only' if args.backbone else ''}"
              f"{', gradient checkpointing' if args.grad_checkpointing else ''}"
              f"{', torch.compile' if args.compile else ''}"
              f"{', OverLoCK without recomputation (--no-lean)' if args.lean is False else ''}"
              f"{', OverLoCK lean=max' if args.lean == 'max' else ''}"
              f"{', OverLoCK lean=True' if args.lean is True else ''}")
        print(f"{'model':18}{'mode':7}{'ms/step':>10}{'img/s':>9}{'peak MiB':>10}{'params M':>10}{'spread':>10}")
        results: Dict = {}
        spec = dict(common, size=[h, w], dtype=args.dtype, channels_last=args.channels_last, backbone=args.backbone,
                    grad_checkpointing=args.grad_checkpointing, lean=args.lean, compile=args.compile)
        for _ in range(args.repeats):  # models alternate, so a slow spell of the machine hits each of them
            for model in args.models:
                for mode in args.modes:
                    r = _worker(dict(spec, kind='model', model=model, mode=mode, profile=args.profile))
                    results.setdefault((model, mode), []).append(r)
        for (model, mode), runs in results.items():
            ok = [r for r in runs if 'error' not in r]
            if not ok:
                print(f'{model:18}{mode:7} error: {runs[0]["error"]}')
                rows.append(dict(model=model, mode=mode, size=[h, w], **runs[0]))
                continue
            times = [r['seconds'] for r in ok]
            r = dict(model=model, mode=mode, size=[h, w], seconds=statistics.median(times),
                     peak_mib=statistics.median(r['peak_mib'] for r in ok), params_m=ok[0]['params_m'],
                     runs=[r['seconds'] for r in ok], peak_runs=[r['peak_mib'] for r in ok],
                     profile=ok[0].get('profile'), compile_s=[r['compile_s'] for r in ok] if args.compile else None)
            r['images_per_s'] = args.batch / r['seconds']
            rows.append(r)
            spread = (max(times) - min(times)) / r['seconds'] * 100
            print(f"{model:18}{mode:7}{r['seconds'] * 1e3:10.1f}{r['images_per_s']:9.2f}"
                  f"{r['peak_mib']:10.0f}{r['params_m']:10.2f}{spread:9.0f}%")
        for r in rows:
            if r.get('compile_s'):
                print(f"  {r['model']} {r['mode']}: compiled in {', '.join(f'{c:.0f}' for c in r['compile_s'])} s")
            for name, ms, calls in r.get('profile') or []:
                print(f"  {r['model']} {r['mode']}: {ms:9.2f} ms {calls:6d}x  {name}")
        sys.stdout.flush()
        by = {(r['model'], r['mode']): r for r in rows if 'error' not in r}
        for ours, peer in PEERS:
            for mode in args.modes:
                if (ours, mode) in by and (peer, mode) in by:
                    a, b = by[(ours, mode)], by[(peer, mode)]
                    print(f'{ours}/{peer} {mode}: time x{a["seconds"] / b["seconds"]:.2f}, '
                          f'peak memory x{a["peak_mib"] / max(b["peak_mib"], 1e-3):.2f}')
        for mode in args.modes if args.paired else []:
            times = _worker(dict(spec, kind='paired', models=args.models, mode=mode, rounds=args.paired))
            if 'error' in times:
                print(f'paired {mode} error: {times["error"]}')
                rows.append(dict(paired=mode, size=[h, w], error=times['error']))
                continue
            rows.append(dict(paired=mode, size=[h, w], rounds=args.paired, seconds=times))
            print(f'paired, one process, {args.paired} rounds, {mode}: '
                  + ', '.join(f'{m} {statistics.median(t) * 1e3:.1f} ms' for m, t in times.items()))
            for ours, peer in PEERS:
                if ours in times and peer in times:
                    ratios = sorted(a / b for a, b in zip(times[ours], times[peer]))
                    print(f'{ours}/{peer} {mode} (paired): time x{statistics.median(ratios):.2f} '
                          f'(rounds {ratios[0]:.2f}-{ratios[-1]:.2f})')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
