#!/usr/bin/env python
"""Speed and memory of OverLoCK against timm peers, in one run, plus the ContMix aggregation operator alone.

Every measurement runs in a fresh worker process (so peak memory is that measurement's alone), ``--repeats`` times
with the models alternating; each figure is the median over those processes of each process's median step time
(the spread column is (max - min) / median over the processes). CPU peak memory is the rise of the resident set
(VmHWM, reset through /proc/self/clear_refs) over all steps above the state after the model and input were built
(measured before the first step: glibc keeps much of a step's memory afterwards, and a baseline taken then hides a
varying part of the peak); CUDA peak memory is torch.cuda.max_memory_allocated above the same point.
  infer: eval, no grad, deploy (re-parameterised) form for OverLoCK;  train: forward + backward, training form.
  OverLoCK runs as the launchers build it (``overlock_core.accel.auto_config``): on CPUs the accelerated forms with
  lean=True ('max' with --backbone), on GPUs the paper form; --plain, --no-lean, --lean and --lean-max choose.

  python tools/benchmark.py                                   # 224x224, batch 8, CPU, 2 threads
  python tools/benchmark.py --size 800 1280 --batch 1 --modes train --backbone
  python tools/benchmark.py --modes train --plain             # OverLoCK in the paper form (no accel layer)
  python tools/benchmark.py --modes train --no-lean           # accelerated forms without recomputation
  python tools/benchmark.py --modes train --lean-max          # lean='max': no hidden MLP map kept
  python tools/benchmark.py --ops                             # aggregation operator vs the unfold formulation
  python tools/benchmark.py --device cuda --dtype bf16 --channels-last --json bench.json
  python tools/benchmark.py --models overlock_t --modes train --repeats 1 --profile 20   # where a step's time goes
  python tools/benchmark.py --compile --device cuda          # both models through torch.compile (slow to compile on CPU)
  python tools/benchmark.py --models overlock_t convnext_tiny --modes train --paired 10   # plus ratios from one process
  python tools/benchmark.py --device cuda --realistic --repeats 1 --json real.json   # the GPU figures (see docs/gpu.md)
  python tools/benchmark.py --device cuda --ops dwconv --json dwconv.json   # cuDNN vs Triton depth-wise table
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


def _is_overlock(model) -> bool:
    return any(type(m).__module__.startswith('overlock_core') for m in model.modules())


def _form(model) -> str:
    """How the model ran (``accel.form_name``), '' for other models."""
    from overlock_core.accel import form_name
    return form_name(model) if _is_overlock(model) else ''


def _build(a: Dict):
    """(the model, one step of it on its own input) as ``a`` describes them."""
    import timm
    import overlock_core  # noqa: F401
    dev, dtype = a['device'], DTYPES[a['dtype']]
    kw = {}
    if a['backbone']:
        kw = dict(features_only=True, out_indices=(0, 1, 2, 3))
    model = timm.create_model(a['model'], **kw)
    if _is_overlock(model):
        from overlock_core.accel import accelerate, resolve
        accelerate(model, resolve(a.get('accel') or 'auto', dense=a['backbone'], device=dev))
    model = model.to(dev)
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
    opt = scaler = None
    if a.get('optimizer') and a['mode'] == 'train':  # a full training step: AdamW, and a GradScaler under fp16
        opt = torch.optim.AdamW(params.parameters(), lr=1e-5, **({'fused': True} if dev == 'cuda' else {}))
        scaler = torch.amp.GradScaler(dev, enabled=dtype == torch.float16)

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
            if opt is None:
                loss.backward()
                for p in params.parameters():
                    p.grad = None
                return
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    return params, step


def _print_forms(rows: List[Dict]) -> None:
    """One line per form OverLoCK ran in (the workers report it: ``_form``)."""
    for form in dict.fromkeys(r['form'] for r in rows if r.get('form')):
        print(f'OverLoCK ran in the {form}' if form == 'paper form' else f'OverLoCK ran {form}')


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
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, compile_s=compile_s, form=_form(model))
    if a.get('profile'):
        res['profile'], res['profile_kinds'] = _profile(step, dev, a['profile'])
    return res


def run_suite(a: Dict) -> List[Dict]:
    """The cases of ``a['cases']`` one after the other in this process (one model, one precision): the process
    start is paid once; each peak is that case's own (CUDA: allocated bytes above the state before its step)."""
    import gc
    out = []
    for case in a['cases']:
        try:
            out.append(run_model(dict(a, **case)))
        except Exception as e:  # e.g. out of memory: the other cases still run
            out.append(dict(error=f'{type(e).__name__}: {e}'.splitlines()[0][:300]))
        gc.collect()
        if a['device'] == 'cuda':
            torch.cuda.empty_cache()
    return out


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


def _profile(step, device: str, top: int):
    """([op, ms, calls] of the ``top`` operators by self time (device time on CUDA) over one step,
    {kind: ms} over all of them, ``KINDS``)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == 'cuda':
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        step()
        _sync(device)
    key = 'self_device_time_total' if device == 'cuda' else 'self_cpu_time_total'
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [[e.key, getattr(e, key) / 1e3, e.count] for e in events], _kinds(prof.events(), device)


KINDS = ('depthwise conv', 'conv', 'matmul', 'norm', 'elementwise', 'other')
_KIND_PATTERNS = (  # lower-case name fragments, tried in this order (op names on the CPU, kernel names on CUDA)
    ('depthwise conv', ('depthwise', 'dwconv', 'grouped_direct', 'fft')),  # CPU: FFTs serve depth-wise gradients
    ('conv', ('conv', 'fprop', 'dgrad', 'wgrad', 'implicit', 'winograd', 'nchwtonhwc', 'nhwctonchw')),
    ('matmul', ('gemm', 'matmul', 'mm', 'cutlass', 'linear', 'cublas')),
    ('norm', ('_norm', 'norm_', 'welford', 'bn_', 'grn')),  # not 'normal_' (random numbers)
    ('elementwise', ('elementwise', 'add', 'mul', 'sub', 'div', 'gelu', 'silu', 'sigmoid', 'relu', 'copy', 'clone',
                     'fill', 'where', 'pow', 'sqrt', 'exp', 'neg', 'clamp', 'cat', 'zero', 'scale', 'to_copy')),
)


def _depthwise_shapes(shapes) -> bool:
    """Whether an op's input shapes hold a depth-wise kernel (C, 1, K, K), K > 1."""
    return any(len(s) == 4 and s[1] == 1 and s[2] == s[3] > 1 for s in shapes or () if isinstance(s, list))


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in _KIND_PATTERNS if any(p in low for p in parts)), 'other')


def _kinds(events, device: str) -> Dict[str, float]:
    """ms per kind (``KINDS``) over one profiled step: on CUDA every kernel's device time (the kernels an op with a
    depth-wise kernel among its inputs launched count as depth-wise conv, the rest by kernel name), on the CPU
    every op's self time (an op with a depth-wise kernel among its inputs: depth-wise conv)."""
    from collections import Counter
    from torch.autograd import DeviceType
    out = dict.fromkeys(KINDS, 0.0)
    if device == 'cuda':
        total, dw = Counter(), Counter()  # us per kernel name: all launches, launches by depth-wise ops
        for e in events:
            if e.device_type != DeviceType.CPU:
                total[e.name] += e.device_time_total
            elif _depthwise_shapes(e.input_shapes):
                for k in e.kernels:
                    dw[k.name] += k.duration
        for name, us in total.items():
            mine = min(dw[name], us)
            out['depthwise conv'] += mine / 1e3
            out[_kind(name)] += (us - mine) / 1e3
    else:
        for e in events:
            kind = 'depthwise conv' if _depthwise_shapes(e.input_shapes) else _kind(e.name)
            out[kind] += e.self_cpu_time_total / 1e3
    return out


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


def _kinds_line(kinds: Dict[str, float]) -> str:
    total = sum(kinds.values()) or 1.0
    return ', '.join(f'{k} {ms:.1f} ms ({ms / total:.0%})' for k, ms in kinds.items())


DWCONV_INPUTS = ['224:128', '800x1333:2']  # input HxW:batch of the depth-wise op table (the realistic suite's)


def _parse_input(text: str):
    """'224:128' or '800x1333:2' -> (h, w, batch)."""
    size, _, batch = text.partition(':')
    h, _, w = size.partition('x')
    return int(h), int(w or h), int(batch or 1)


def dwconv_shapes(inputs: List[str], variant: str = 't') -> List[Dict]:
    """Every depth-wise conv shape an OverLoCK variant meets at these inputs: per stage the large kernel, its
    re-parameterisation branches (the dynamic blocks' too) and the 3x3 conv, each (kernel, dilation) once; then the
    stage's DilatedReparamBlock branches together (``drb``: kernel k, every branch)."""
    from overlock_core.models.layers import DRB_BRANCHES
    from overlock_core.models.overlock import get_arch
    cfg = get_arch(variant)
    shapes = []
    for text in inputs:
        h, w, batch = _parse_input(text)
        for stage, (c, big) in enumerate(zip(cfg['dims'], cfg['kernel_sizes'])):
            hs, ws = h, w
            for _ in range(stage + 2):  # stride-2 convs, padding 1: ceil(h / 2) each
                hs, ws = -(-hs // 2), -(-ws // 2)
            for k, d in dict.fromkeys(((big, 1),) + DRB_BRANCHES[big] + ((3, 1),)):
                shapes.append(dict(input=text, stage=stage + 1, batch=batch, c=c, h=hs, w=ws, k=k, d=d))
            shapes.append(dict(input=text, stage=stage + 1, batch=batch, c=c, h=hs, w=ws, k=big, d='drb'))
    return shapes


def _dwconv_impls(shape: Dict, x: torch.Tensor, grad: torch.Tensor) -> Dict:
    """name -> (step: forward + both gradients, forward alone) for one row of the depth-wise table: 'cudnn'
    (F.conv2d, a launch per branch for a ``drb`` row) and, where the kernels can run, 'triton' (``dw_conv2d`` with
    ``KERNELS.triton_dwconv`` on; for a ``drb`` row the branches in one launch per pass)."""
    import torch.nn.functional as F
    from overlock_core.models.layers import DRB_BRANCHES
    from overlock_core.ops import dw_conv2d, triton_dwconv
    from overlock_core.ops.config import using
    c, k, d = x.shape[1], shape['k'], shape['d']
    branches = ((k, 1),) + DRB_BRANCHES[k] if d == 'drb' else ((k, d),)
    weights = [(torch.randn(c, 1, kb, kb, device=x.device) / kb).to(x.dtype).requires_grad_() for kb, _ in branches]
    dils = [db for _, db in branches]

    def backward(outs):
        torch.autograd.backward(outs, [grad] * len(outs))
        for t in [x] + weights:
            t.grad = None

    def cudnn():
        return [F.conv2d(x, w, None, 1, db * (w.shape[-1] - 1) // 2, db, c) for w, db in zip(weights, dils)]
    impls = {'cudnn': (lambda: backward(cudnn()), cudnn)}
    if not triton_dwconv.available(x) or not all(triton_dwconv.supported(kb, db) for kb, db in branches):
        return impls
    if d == 'drb':
        stack = grad.expand(len(weights), *grad.shape)

        def fused_step():
            triton_dwconv.branches_forward(x, weights, dils)
            triton_dwconv.branches_input_grad(stack, weights, dils)
            triton_dwconv.branches_weight_grad(x, stack, weights, dils)
        impls['triton'] = (fused_step, lambda: triton_dwconv.branches_forward(x, weights, dils))
    else:
        def triton():
            with using(triton_dwconv=True):
                return dw_conv2d(x, weights[0], None, d)

        def triton_step():
            with using(triton_dwconv=True):
                backward([triton()])
        impls['triton'] = (triton_step, triton)
    return impls


def run_dwconv(a: Dict) -> List[Dict]:
    """Forward + both gradients (and forward alone) of each depth-wise shape of ``a['shapes']``, per dtype and
    layout: cuDNN (F.conv2d; oneDNN on the CPU) against the Triton kernels where they can run (``_dwconv_impls``).
    ``warm_only``: one call of each Triton shape, timing nothing (fills Triton's kernel cache, several processes at
    once)."""
    dev, rows = a['device'], []
    for shape in a['shapes']:
        n, c, h, w = (shape[key] for key in ('batch', 'c', 'h', 'w'))
        for dtype_name in a['dtypes']:
            for layout in ('nchw', 'channels_last'):
                fmt = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
                x = torch.randn(n, c, h, w, device=dev).to(DTYPES[dtype_name]).contiguous(memory_format=fmt)
                grad = torch.randn_like(x)
                x.requires_grad_()
                row = dict(shape, dtype=dtype_name, layout=layout)
                for name, (step, forward) in _dwconv_impls(shape, x, grad).items():
                    if a.get('warm_only') and name != 'triton':
                        continue

                    def no_grad(forward=forward):
                        with torch.no_grad():
                            forward()
                    try:
                        if a.get('warm_only'):
                            step()
                            no_grad()
                            continue
                        row[name] = _time(step, dev, a['warmup'], a['iters']) * 1e3
                        row[name + '_fwd'] = _time(no_grad, dev, a['warmup'], a['iters']) * 1e3
                    except Exception as e:  # e.g. a compile failure: the other shapes still run
                        row[name + '_error'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
                rows.append(row)
                del x, grad
    return rows


def measured_entries(rows: List[Dict], drb: bool = False) -> Dict:
    """triton_dwconv.MEASURED entries from the op table: (kernel, dilation, map bucket, dtype) -> True where the
    Triton kernels were faster (forward + both gradients) for every shape and layout measured with that key,
    False where any was slower; ``drb``: the MEASURED_DRB entries (block kernel, map bucket, dtype) of the branch
    sets."""
    from overlock_core.ops.triton_dwconv import map_bucket
    verdict: Dict = {}
    for r in rows:
        if 'cudnn' not in r or 'triton' not in r or (r['d'] == 'drb') != drb:
            continue
        key = (r['k'],) + ((r['d'],) if not drb else ()) + (map_bucket(r['h'], r['w']), r['dtype'])
        verdict[key] = verdict.get(key, True) and r['triton'] < r['cudnn']
    return dict(sorted(verdict.items(), key=lambda kv: (kv[0][-1], -kv[0][0]) + kv[0][1:-1]))


def _dwconv_table(args, common: Dict) -> List[Dict]:
    shapes = dwconv_shapes(args.dwconv_inputs)
    spec = dict(common, kind='dwconv', dtypes=args.op_dtypes)
    if args.device == 'cuda' and args.jobs > 1:  # compile every Triton shape first, in parallel processes
        chunks = [shapes[i::args.jobs] for i in range(args.jobs)]
        procs = [_spawn(dict(spec, shapes=chunk, warm_only=True)) for chunk in chunks if chunk]
        for p in procs:
            p.communicate()
    rows = _worker(dict(spec, shapes=shapes))
    if isinstance(rows, dict):  # the worker failed as a whole
        print(f'depth-wise op table error: {rows["error"]}')
        return [rows]
    print(f'depth-wise conv, forward + both gradients (forward alone), {args.device}: cuDNN against Triton')
    print("(dilation 'drb': the stage's DilatedReparamBlock branches together; Triton: one launch per pass)")
    print('| input | stage | C | map | kernel | dilation | dtype | layout | cuDNN ms | Triton ms | speed-up |'
          ' fwd cuDNN ms | fwd Triton ms |')
    print('|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|')
    for r in rows:
        tri = r.get('triton')
        speedup = f"{r['cudnn'] / tri:.2f}x" if tri and r.get('cudnn') else 'n/a'
        err = r.get('triton_error') or r.get('cudnn_error')

        def ms(key):
            return f'{r[key]:.3f}' if key in r else ('error' if err else 'n/a')
        print(f"| {r['input']} | {r['stage']} | {r['c']} | {r['h']}x{r['w']} | {r['k']} | {r['d']} | {r['dtype']} | "
              f"{r['layout']} | {ms('cudnn')} | {ms('triton')} | {speedup} | {ms('cudnn_fwd')} | {ms('triton_fwd')} |")
        if err:
            print(f'  error: {err}')
    for name, drb in (('MEASURED', False), ('MEASURED_DRB', True)):
        entries = measured_entries(rows, drb)
        if not entries:
            print(f'no Triton timings (no CUDA device, or Triton missing): {name} stays empty')
            continue
        print(f'triton_dwconv.{name} (True: Triton faster in every shape and layout of the key):')
        print(f'{name} = {{')
        for key, value in entries.items():
            print(f'    {key!r}: {value},')
        print('}')
    return rows


REALISTIC_CASES = ('train', 'infer', 'dense')


def _realistic(args, common: Dict) -> List[Dict]:
    """Training and inference at ``--size`` (batch ``--realistic-batch``) and a dense backbone training step at
    ``--dense-size`` (batch ``--dense-batch``), channels-last, each model under each precision of ``--precisions``
    (autocast; training with AdamW, and a GradScaler under fp16); a markdown table with the ratios to the peer."""
    models = args.models or ['overlock_t', 'convnext_tiny']
    cases = [dict(case='train', mode='train', size=list(args.size), batch=args.realistic_batch, backbone=False),
             dict(case='infer', mode='infer', size=list(args.size), batch=args.realistic_batch, backbone=False),
             dict(case='dense', mode='train', size=list(args.dense_size), batch=args.dense_batch, backbone=True)]
    spec = dict(common, kind='suite', cases=cases, channels_last=True, optimizer=True, accel=args.accel,
                grad_checkpointing=args.grad_checkpointing, compile=args.compile, profile=args.profile)
    results: Dict = {}
    for _ in range(args.repeats):
        for precision in args.precisions:
            for model in models:
                runs = _worker(dict(spec, model=model, dtype=precision))
                for case, r in zip(cases, runs if isinstance(runs, list) else [runs] * len(cases)):
                    results.setdefault((model, precision, case['case']), []).append(r)
    rows = []
    for (model, precision, case), runs in results.items():
        c = next(c for c in cases if c['case'] == case)
        ok = [r for r in runs if 'error' not in r]
        row = dict(model=model, precision=precision, case=case, mode=c['mode'], size=c['size'], batch=c['batch'],
                   backbone=c['backbone'])
        if not ok:
            rows.append(dict(row, error=runs[0]['error']))
            continue
        sec = statistics.median(r['seconds'] for r in ok)
        rows.append(dict(row, seconds=sec, images_per_s=c['batch'] / sec,
                         peak_mib=statistics.median(r['peak_mib'] for r in ok), runs=[r['seconds'] for r in ok],
                         profile=ok[0].get('profile'), profile_kinds=ok[0].get('profile_kinds'), form=ok[0]['form']))
    by = {(r['model'], r['precision'], r['case']): r for r in rows}
    peer_of = dict(PEERS)
    print(f"{args.device}, channels-last, autocast; training: AdamW step (GradScaler under fp16); "
          f"{args.repeats} process(es) per model and precision, medians")
    print('| model | precision | mode | img/s or ms/step | peak MiB | vs ConvNeXt-T |')
    print('|---|---|---|---:|---:|---|')
    for r in rows:
        h, w = r['size']
        what = (f"{'dense backbone train' if r['case'] == 'dense' else r['mode']} {h}x{w}, batch {r['batch']}")
        if 'error' in r:
            print(f"| {r['model']} | {r['precision']} | {what} | error: {r['error']} | | |")
            continue
        figure = f"{r['seconds'] * 1e3:.1f} ms/step" if r['case'] == 'dense' else f"{r['images_per_s']:.0f} img/s"
        peer = by.get((peer_of.get(r['model']), r['precision'], r['case']))
        ratio = '1 (reference)' if r['model'] in peer_of.values() else 'n/a'
        if peer is not None and 'error' not in peer:
            r['time_ratio'] = r['seconds'] / peer['seconds']
            r['memory_ratio'] = r['peak_mib'] / max(peer['peak_mib'], 1e-3)
            speed = f"{r['time_ratio']:.2f}x time" if r['case'] == 'dense' else f"{1 / r['time_ratio']:.2f}x img/s"
            ratio = f"{speed}, {r['memory_ratio']:.2f}x memory"
        print(f"| {r['model']} | {r['precision']} | {what} | {figure} | {r['peak_mib']:.0f} | {ratio} |")
    _print_forms(rows)
    for r in rows:
        if 'time_ratio' not in r:
            continue
        goal = {'train': ('img/s', 1 / r['time_ratio'], '>=', 0.6), 'infer': ('img/s', 1 / r['time_ratio'], '>=', 0.7),
                'dense': ('time', r['time_ratio'], '<=', 2.5)}[r['case']]
        checks = [goal] + ([('memory', r['memory_ratio'], '<=', 1.5)] if r['case'] == 'dense' else [])
        verdicts = [f"{name} {v:.2f}x ({op} {lim}x: {'met' if (v >= lim if op == '>=' else v <= lim) else 'not met'})"
                    for name, v, op, lim in checks]
        print(f"goal, {r['model']} {r['precision']} {r['case']}: {'; '.join(verdicts)}")
    for r in rows:
        for name, ms, calls in r.get('profile') or []:
            print(f"  {r['model']} {r['precision']} {r['case']}: {ms:9.2f} ms {calls:6d}x  {name}")
        if r.get('profile_kinds'):
            print(f"  {r['model']} {r['precision']} {r['case']} by kind: {_kinds_line(r['profile_kinds'])}")
    return rows


def _spawn(spec: Dict) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec['threads']))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


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
    ap.add_argument('--models', nargs='+', default=None, help=f'default: {" ".join(DEFAULT_MODELS)}')
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
    accel = ap.add_mutually_exclusive_group()  # default: overlock_core.accel.auto_config, as the launchers
    accel.add_argument('--plain', dest='accel', action='store_const', const='off', default=None,
                       help='OverLoCK in the paper form (no accelerated modules)')
    accel.add_argument('--lean', dest='accel', action='store_const', const=dict(lean=True),
                       help='OverLoCK accelerated with lean=True')
    accel.add_argument('--no-lean', dest='accel', action='store_const', const=dict(lean=False),
                       help='OverLoCK accelerated without recomputation (more memory)')
    accel.add_argument('--lean-max', dest='accel', action='store_const', const=dict(lean='max'),
                       help="OverLoCK accelerated with lean='max' (the MLPs keep no hidden map: less memory)")
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
                         '(one process\'s step times drift on a shared CPU)')
    ap.add_argument('--paired', type=int, default=0, metavar='ROUNDS',
                    help='also time all models in one process, one step each per round for ROUNDS rounds (the '
                         'order rotating): time ratios from the same rounds, free of drift between processes')
    ap.add_argument('--ops', nargs='?', const='av', choices=['av', 'dwconv'],
                    help="benchmark an operator instead of models: 'av' (the default) the aggregation operator "
                         "against the unfold formulation; 'dwconv' every depth-wise conv shape of OverLoCK-T, cuDNN "
                         "against the Triton kernels, and the triton_dwconv.MEASURED entries from it")
    ap.add_argument('--op-shapes', nargs='+', default=list(OP_SHAPES))
    ap.add_argument('--op-dtypes', nargs='+', default=['fp16', 'bf16'], choices=list(DTYPES),
                    help='--ops dwconv: the dtypes timed')
    ap.add_argument('--dwconv-inputs', nargs='+', default=DWCONV_INPUTS, metavar='HxW:BATCH',
                    help='--ops dwconv: the model inputs whose depth-wise shapes are timed')
    ap.add_argument('--jobs', type=int, default=8,
                    help='--ops dwconv on CUDA: processes compiling the Triton kernels before the timing')
    ap.add_argument('--realistic', action='store_true',
                    help='overlock_t vs convnext_tiny (or --models) under each of --precisions, channels-last, '
                         'AdamW steps: training and inference img/s at --size, batch --realistic-batch, and a dense '
                         'backbone training step at --dense-size, batch --dense-batch; a markdown table')
    ap.add_argument('--precisions', nargs='+', default=['fp16', 'bf16'], choices=list(DTYPES))
    ap.add_argument('--realistic-batch', type=int, default=128)
    ap.add_argument('--dense-size', type=int, nargs=2, default=[800, 1333], metavar=('H', 'W'))
    ap.add_argument('--dense-batch', type=int, default=2)
    ap.add_argument('--optimizer', action='store_true',
                    help='training steps include an AdamW step (and a GradScaler under fp16)')
    ap.add_argument('--json', help='write all rows to this file')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec['threads'])
        torch.backends.cudnn.benchmark = spec.get('cudnn_benchmark', False)
        run = {'op': run_op, 'paired': run_paired, 'suite': run_suite, 'dwconv': run_dwconv}.get(spec.get('kind'),
                                                                                                   run_model)
        print(json.dumps(run(spec)))
        return
    common = dict(device=args.device, threads=args.threads, batch=args.batch, warmup=args.warmup, iters=args.iters,
                  cudnn_benchmark=args.cudnn_benchmark)
    rows: List[Dict] = []
    if args.realistic:
        rows = _realistic(args, common)
    elif args.ops == 'dwconv':
        rows = _dwconv_table(args, common)
    elif args.ops:
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
              f"{', torch.compile' if args.compile else ''}")
        print(f"{'model':18}{'mode':7}{'ms/step':>10}{'img/s':>9}{'peak MiB':>10}{'params M':>10}{'spread':>10}")
        args.models = args.models or DEFAULT_MODELS
        results: Dict = {}
        spec = dict(common, size=[h, w], dtype=args.dtype, channels_last=args.channels_last, backbone=args.backbone,
                    grad_checkpointing=args.grad_checkpointing, accel=args.accel, compile=args.compile,
                    optimizer=args.optimizer)
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
                     profile=ok[0].get('profile'), profile_kinds=ok[0].get('profile_kinds'),
                     compile_s=[r['compile_s'] for r in ok] if args.compile else None, form=ok[0]['form'])
            r['images_per_s'] = args.batch / r['seconds']
            rows.append(r)
            spread = (max(times) - min(times)) / r['seconds'] * 100
            print(f"{model:18}{mode:7}{r['seconds'] * 1e3:10.1f}{r['images_per_s']:9.2f}"
                  f"{r['peak_mib']:10.0f}{r['params_m']:10.2f}{spread:9.0f}%")
        _print_forms(rows)
        for r in rows:
            if r.get('compile_s'):
                print(f"  {r['model']} {r['mode']}: compiled in {', '.join(f'{c:.0f}' for c in r['compile_s'])} s")
            for name, ms, calls in r.get('profile') or []:
                print(f"  {r['model']} {r['mode']}: {ms:9.2f} ms {calls:6d}x  {name}")
            if r.get('profile_kinds'):
                print(f"  {r['model']} {r['mode']} by kind: {_kinds_line(r['profile_kinds'])}")
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
