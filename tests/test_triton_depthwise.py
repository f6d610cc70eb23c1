"""The fused Triton depth-wise convolution: checked on the CPU through Triton's interpreter (so CI runs the kernels
without a GPU), against cuDNN on CUDA when a GPU is present, and its dispatch rule (cuDNN unless measured or
switched on)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from overlock_core.ops import triton_dwconv
from overlock_core.ops.config import KERNELS
from triton_marks import OLD_INTERPRETER, needs_cuda, needs_triton


# Run in a fresh interpreter: TRITON_INTERPRET must be set before the kernels are defined. Small shapes (the
# interpreter runs each program's tap loop in Python); the reference is F.conv2d and its autograd.
INTERPRETED = textwrap.dedent('''
    import sys
    import torch
    import torch.nn.functional as F
    from overlock_core.ops import dw_conv2d, triton_dwconv as T
    from overlock_core.ops.config import KERNELS
    assert T.available(torch.zeros(1)) and KERNELS.triton_dwconv
    calls = []  # dw_conv2d must reach the kernels: forward, input and weight gradients
    for name in ('dwconv_forward', 'dwconv_input_grad', 'dwconv_weight_grad'):
        setattr(T, name, lambda *a, _fn=getattr(T, name), _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    torch.manual_seed(0)
    CL = torch.channels_last
    D, S = torch.float64, torch.float32
    # n, c, h, w, kernel, dilation, layout, dtype, bias: non-square maps, maps several tiles wide, maps smaller
    # than the (dilated) kernel, a strided view
    CASES = [(2, 3, 9, 11, 3, 1, 'nchw', D, True), (2, 4, 7, 12, 5, 2, 'cl', S, False),
             (1, 5, 10, 8, 7, 3, 'nchw', D, False), (1, 3, 6, 9, 13, 1, 'cl', D, True),
             (1, 2, 5, 19, 17, 1, 'nchw', S, True), (2, 3, 12, 10, 3, 5, 'cl', D, False),
             (1, 3, 9, 7, 5, 1, 'view', D, False)]
    for n, c, h, w, k, d, layout, dtype, with_bias in CASES:
        x = torch.randn(n, c, h, w + (layout == 'view'), dtype=dtype)
        x = x[..., 1:] if layout == 'view' else x.contiguous(memory_format=CL) if layout == 'cl' else x
        weight = torch.randn(c, 1, k, k, dtype=dtype)
        bias = torch.randn(c, dtype=dtype) if with_bias else None
        leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
        calls.clear()
        out = dw_conv2d(x, weight, bias, d)
        assert out.dtype == dtype and out.shape == x.shape
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, g)
        assert calls == ['dwconv_forward', 'dwconv_input_grad', 'dwconv_weight_grad'], calls
        kept = T.dwconv_forward(x.detach(), weight.detach(), None, d)  # (dw_conv2d's CPU layout rule aside)
        assert kept.is_contiguous(memory_format=CL) == (layout == 'cl'), 'output not in the input layout'
        ref = F.conv2d(x, weight, bias, padding=d * (k - 1) // 2, dilation=d, groups=c)
        want = torch.autograd.grad(ref, leaves, g)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == D else dict(rtol=1e-5, atol=1e-5)
        for a, b in zip((out,) + got, (ref,) + want):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)
        # one gradient asked for
        gx, gw = T.dwconv_backward(x.detach(), weight.detach(), g, d, (True, False))
        assert gw is None
        torch.testing.assert_close(gx, want[0], **tol)
        print('ok', n, c, h, w, k, d, layout, dtype, file=sys.stderr)
    # half precisions: inputs rounded once, accumulation in fp32 (checked against fp32 on the rounded inputs)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(2, 4, 6, 9).to(dtype).contiguous(memory_format=CL)
        weight = (torch.randn(4, 1, 7, 7) / 7).to(dtype)
        out = T.dwconv_forward(x, weight, None, 2)
        g = torch.randn_like(out)
        gx = T.dwconv_input_grad(g, weight, 2)
        gw = T.dwconv_weight_grad(x, g, 7, 2, dtype=torch.float32)
        gw_half = T.dwconv_weight_grad(x, g, 7, 2)
        xs, ws = x.float().requires_grad_(), weight.float().requires_grad_()
        ref = F.conv2d(xs, ws, padding=6, dilation=2, groups=4)
        rx, rw = torch.autograd.grad(ref, (xs, ws), g.float())
        assert out.dtype == gx.dtype == gw_half.dtype == dtype and gw.dtype == torch.float32
        eps = 1e-2 if dtype == torch.float16 else 4e-2  # one rounding of the fp32 result
        torch.testing.assert_close(out.float(), ref, rtol=eps, atol=eps)
        torch.testing.assert_close(gx.float(), rx, rtol=eps, atol=eps)
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)  # fp32 sums of exact products
        torch.testing.assert_close(gw_half.float(), rw, rtol=eps, atol=eps)
        print('ok', dtype, file=sys.stderr)
    # autocast: the conv runs in the autocast dtype, gradients reach the fp32 leaves in fp32
    x = torch.randn(1, 3, 5, 6, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, requires_grad=True)
    calls.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dw_conv2d(x, weight)
    gx, gw = torch.autograd.grad(out.float().sum(), (x, weight))
    assert out.dtype == torch.bfloat16 and gx.dtype == gw.dtype == torch.float32 and len(calls) == 3
    ref = F.conv2d(x, weight, padding=2, groups=3)
    torch.testing.assert_close(out.float(), ref, rtol=4e-2, atol=4e-2)
    # compiled: the operator is opaque to the compiler, same results
    xs, ws = x.detach().requires_grad_(), weight.detach().requires_grad_()
    out_c = torch.compile(lambda a, b: dw_conv2d(a, b), backend='aot_eager', fullgraph=True)(xs, ws)
    torch.testing.assert_close(out_c, F.conv2d(x, weight, padding=2, groups=3))
    print('ok')
''')

# A DilatedReparamBlock's branches in one launch per pass: the kernels against F.conv2d, then the lean block through
# them against the same block a launch per branch (float64: equal to rounding).
INTERPRETED_BRANCHES = textwrap.dedent('''
    import copy
    import torch
    import torch.nn.functional as F
    from overlock_core.accel import accelerate
    from overlock_core.models.layers import RepConvBlock
    from overlock_core.ops import triton_dwconv as T
    from overlock_core.ops.config import using
    torch.manual_seed(0)
    D = torch.float64
    for layout, sizes, dils in [('nchw', (7, 5, 3, 3, 3), (1, 1, 1, 2, 3)), ('cl', (5, 3, 3), (1, 1, 2))]:
        x = torch.randn(2, 3, 9, 11, dtype=D)
        x = x.contiguous(memory_format=torch.channels_last) if layout == 'cl' else x
        ws = [torch.randn(3, 1, k, k, dtype=D) for k in sizes]
        zs = T.branches_forward(x, ws, dils)
        assert zs.shape == (len(sizes),) + x.shape
        assert zs[0].is_contiguous(memory_format=torch.channels_last) == (layout == 'cl')
        xr, wr = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
        refs = [F.conv2d(xr, w, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=3) for w, d in zip(wr, dils)]
        gzs = torch.randn_like(zs)
        want = torch.autograd.grad(refs, [xr] + wr, list(gzs))
        got = [T.branches_input_grad(gzs, ws, dils)] + T.branches_weight_grad(x, gzs, ws, dils)
        for a, b in zip(list(zs) + got, refs + list(want)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the lean block (its LayerNorm inside the branch function) through the fused path and branch by branch
    calls = []
    for name in ('branches_forward', 'branches_input_grad', 'branches_weight_grad'):
        setattr(T, name, lambda *a, _fn=getattr(T, name), _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    block = accelerate(RepConvBlock(4, 7, ls_init_value=0.5)).double().train()
    x = torch.randn(2, 4, 8, 9, dtype=D)
    results = []
    for fused in (True, False):
        m = copy.deepcopy(block)
        xs = x.clone().requires_grad_()
        with using(triton_drb=fused, triton_dwconv=False):
            out = m(xs)
            grads = torch.autograd.grad(out.square().sum(), [xs] + list(m.parameters()))
        drb = m.proj[1]
        results.append((out, grads, [b.running_var for b in drb.convs_and_norms()[1]]))
        assert calls == (['branches_forward', 'branches_forward', 'branches_input_grad', 'branches_weight_grad']
                         if fused else []), calls
        calls.clear()
    for a, b in zip(*[[r[0], *r[1], *r[2]] for r in results]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    print('ok')
''')


def _interpret(script: str, **env_vars) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh interpreter with the Triton kernels interpreted on the CPU."""
    env = dict(os.environ, TRITON_INTERPRET='1', **env_vars)
    return subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=600)


@needs_triton
@pytest.mark.skipif(OLD_INTERPRETER, reason="Triton < 3.8's interpreter fails on numpy >= 2.4")
def test_triton_depthwise_kernels_in_interpreter():
    """dw_conv2d forced through the kernels (KERNELS.triton_dwconv): forward, input gradient and weight gradient
    equal F.conv2d and its autograd: kernels 3 to 17, dilations 1 to 3 and a 3x3 with dilation 5, non-square maps
    smaller than the kernel, NCHW, channels-last and strided inputs, float64 and float32 (bias included), float16
    and bfloat16 with fp32 accumulation, under autocast, and compiled (where the kernels step aside)."""
    res = _interpret(INTERPRETED, OVERLOCK_TRITON_DWCONV='1')
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(OLD_INTERPRETER, reason="Triton < 3.8's interpreter fails on numpy >= 2.4")
def test_triton_depthwise_branches_in_one_launch_in_interpreter():
    """A DilatedReparamBlock's branches in one launch per pass: outputs, the summed input gradient and each kernel
    gradient equal F.conv2d's (NCHW and channels-last, dilations 1 to 3); a lean RepConvBlock through them equals
    the block a launch per branch (output, every gradient, the running statistics), and calls each pass once."""
    res = _interpret(INTERPRETED_BRANCHES)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-3000:]


def test_triton_depthwise_dispatch_defaults_to_cudnn(monkeypatch):
    """Without the switch and without a measured entry the rule says cuDNN; KERNELS.triton_dwconv=True forces the
    kernels, False cuDNN even over a measured entry; unsupported convolutions never take them; CPU tensors only in
    the interpreter when forced. The same for a DilatedReparamBlock's branches together (KERNELS.triton_drb)."""
    monkeypatch.setattr(KERNELS, 'triton_dwconv', None)
    monkeypatch.setattr(triton_dwconv, 'MEASURED', {})
    key = (17, 1, triton_dwconv.map_bucket(56, 56), 'bf16')
    assert key == (17, 1, 64, 'bf16')
    assert not triton_dwconv.decide(17, 1, (56, 56), torch.bfloat16)
    triton_dwconv.MEASURED[key] = True
    assert triton_dwconv.decide(17, 1, (56, 56), torch.bfloat16)
    assert not triton_dwconv.decide(17, 1, (56, 56), torch.float16)  # another dtype: not measured
    assert not triton_dwconv.decide(17, 1, (100, 160), torch.bfloat16)  # another map-size bucket
    monkeypatch.setattr(KERNELS, 'triton_dwconv', False)
    assert not triton_dwconv.decide(17, 1, (56, 56), torch.bfloat16)
    monkeypatch.setattr(KERNELS, 'triton_dwconv', True)
    assert triton_dwconv.decide(7, 3, (7, 7), torch.float32)
    assert not triton_dwconv.decide(19, 1, (56, 56), torch.float32)  # wider than the kernels serve
    assert not triton_dwconv.decide(4, 1, (56, 56), torch.float32)  # even
    assert triton_dwconv.decide(7, 1, (56, 56), torch.float64)  # forced: fp64 too (the interpreter tests)
    monkeypatch.setattr(KERNELS, 'triton_dwconv', None)
    triton_dwconv.MEASURED[(7, 1, 64, 'fp32')] = True
    assert not triton_dwconv.decide(7, 1, (56, 56), torch.float64)  # the table: training dtypes only
    # CPU tensors only when the kernels were defined in the interpreter (not this process), and forced on
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    monkeypatch.setattr(KERNELS, 'triton_dwconv', True)
    assert not triton_dwconv.use_triton(torch.zeros(1, 2, 8, 8), 7, 1)
    monkeypatch.setattr(triton_dwconv, 'INTERPRETED', True)
    assert triton_dwconv.use_triton(torch.zeros(1, 2, 8, 8), 7, 1) == (triton_dwconv.triton is not None)
    monkeypatch.setattr(KERNELS, 'triton_dwconv', None)
    assert not triton_dwconv.use_triton(torch.zeros(1, 2, 8, 56, 56), 7, 1)
    assert not triton_dwconv.use_triton(torch.zeros(1, 2, 56, 56), 7, 1)  # a measured entry: CUDA tensors only
    assert [triton_dwconv.map_bucket(*s) for s in [(7, 7), (14, 14), (28, 28), (56, 56), (50, 80), (200, 333)]] \
        == [16, 16, 32, 64, 64, 0]
    sizes, dils = (17, 5, 7, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)
    monkeypatch.setattr(KERNELS, 'triton_drb', None)
    monkeypatch.setattr(triton_dwconv, 'MEASURED_DRB', {})
    assert not triton_dwconv.decide_branches(sizes, dils, (56, 56), torch.bfloat16)
    triton_dwconv.MEASURED_DRB[(17, 64, 'bf16')] = True
    assert triton_dwconv.decide_branches(sizes, dils, (56, 56), torch.bfloat16)
    assert not triton_dwconv.decide_branches(sizes, dils, (28, 28), torch.bfloat16)
    assert not triton_dwconv.decide_branches((19,) + sizes[1:], dils, (56, 56), torch.bfloat16)  # 19 unsupported
    monkeypatch.setattr(KERNELS, 'triton_drb', False)
    assert not triton_dwconv.decide_branches(sizes, dils, (56, 56), torch.bfloat16)
    monkeypatch.setattr(KERNELS, 'triton_drb', True)
    assert triton_dwconv.decide_branches(sizes, dils, (28, 28), torch.float16)
    monkeypatch.setattr(triton_dwconv, 'INTERPRETED', False)
    assert not triton_dwconv.use_branches(torch.zeros(1, 2, 8, 8), sizes, dils)


@needs_triton
def test_triton_depthwise_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match='odd kernels 3 to 17'):
        triton_dwconv.dwconv_forward(torch.zeros(1, 2, 8, 8), torch.zeros(2, 1, 19, 19), None, 1)


# ----- CUDA: the kernels against cuDNN (no interpreter) -----

CUDA_SHAPES = [(4, 64, 56, 56, 17, 1), (2, 128, 28, 28, 15, 1), (2, 64, 50, 80, 13, 1), (3, 32, 25, 40, 7, 3),
               (4, 48, 14, 14, 3, 5), (2, 16, 9, 37, 9, 2), (1, 8, 5, 6, 17, 1)]


@needs_cuda
@pytest.mark.parametrize('n,c,h,w,k,d', CUDA_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True])
def test_triton_depthwise_cuda_matches_cudnn(n, c, h, w, k, d, dtype, channels_last, monkeypatch):
    """Forward and both gradients equal cuDNN's in fp32 (TF32 off) on the inputs' dtype-rounded values; the half
    precisions within their rounding."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device='cuda').to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c, 1, k, k, device='cuda') / k).to(dtype)
    bias = torch.randn(c, device='cuda').to(dtype)
    g = torch.randn(n, c, h, w, device='cuda').to(dtype)
    out = triton_dwconv.dwconv_forward(x, weight, bias, d)
    gx = triton_dwconv.dwconv_input_grad(g, weight, d)
    gw = triton_dwconv.dwconv_weight_grad(x, g, k, d, dtype=torch.float32)
    xs, ws, bs = (t.float().requires_grad_() for t in (x, weight, bias))
    ref = F.conv2d(xs, ws, bs, padding=d * (k - 1) // 2, dilation=d, groups=c)
    rx, rw = torch.autograd.grad(ref, (xs, ws), g.float())
    assert out.dtype == gx.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    eps = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=eps, atol=eps)
    torch.testing.assert_close(gx.float(), rx, rtol=eps, atol=eps)
    # fp32 sums over n * h * w products: relative to the gradient's scale
    scale = rw.abs().max().item()
    torch.testing.assert_close(gw, rw, rtol=1e-3, atol=1e-4 * scale)


@needs_cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_triton_depthwise_cuda_dispatch_through_dw_conv2d(dtype, monkeypatch):
    """KERNELS.triton_dwconv=True sends dw_conv2d (under autocast) and its backward through the kernels, with
    cuDNN's results; False and None (the table is empty) keep cuDNN."""
    from overlock_core.ops import dw_conv2d
    calls = []
    for name in ('dwconv_forward', 'dwconv_weight_grad'):
        fn = getattr(triton_dwconv, name)
        monkeypatch.setattr(triton_dwconv, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    x = torch.randn(2, 32, 28, 28, device='cuda').contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 1, 13, 13, device='cuda') / 13
    results = []
    monkeypatch.setattr(triton_dwconv, 'MEASURED', {})
    for flag in ('1', '0', None):
        monkeypatch.setattr(KERNELS, 'triton_dwconv', {'1': True, '0': False, None: None}[flag])
        calls.clear()
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast('cuda', dtype=dtype):
            out = dw_conv2d(xs, ws, None, 1)
        grads = torch.autograd.grad(out.float().square().sum(), (xs, ws))
        assert out.dtype == dtype and grads[1].dtype == torch.float32
        assert calls == (['dwconv_forward', 'dwconv_weight_grad'] if flag == '1' else [])
        results.append((out.float(),) + grads)
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


@needs_cuda
@pytest.mark.parametrize('branches', [False, True])
def test_triton_depthwise_cuda_model_step_matches_cudnn(branches, monkeypatch):
    """A whole OverLoCK training step on CUDA (lean form: the re-parameterisation branches' recomputing functions)
    gives the same outputs and gradients with the Triton kernels forced on as with cuDNN (fp32, TF32 off); with
    ``branches`` each DilatedReparamBlock's branches run together (KERNELS.triton_drb)."""
    from overlock_core.accel import accelerate
    from overlock_core.models import OverLoCK
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    torch.manual_seed(0)
    model = accelerate(OverLoCK('test', num_classes=5)).cuda().train()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    calls = []
    names = ['dwconv_forward', 'dwconv_backward'] + ['branches_forward', 'branches_input_grad',
                                                     'branches_weight_grad'] * branches
    for name in names:
        fn = getattr(triton_dwconv, name)
        monkeypatch.setattr(triton_dwconv, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    results = []
    for flag in ('1', '0'):
        monkeypatch.setattr(KERNELS, 'triton_dwconv', flag == '1')
        monkeypatch.setattr(KERNELS, 'triton_drb', branches and flag == '1')
        calls.clear()
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        results.append((out, grads))
        # both passes of the re-parameterisation branches (recomputing functions) and of plain dw_conv2d
        assert (set(calls) == set(names)) if flag == '1' else not calls
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ----- GPU code without a GPU: the kernels compiled ahead of time (tools/kernel_report.py) -----

@needs_triton
@pytest.mark.skipif(triton_dwconv.INTERPRETED, reason='the kernels are interpreted in this process')
def test_triton_depthwise_and_aggregation_kernels_compile_for_gpus_without_one():
    """Every Triton kernel compiles to GPU code on this CPU machine, from the arguments the launch functions pass,
    specialised as the JIT would: sm_90 (H100/H200) in bf16, channels-last and NCHW, and sm_80 (A100) in fp32. Type
    errors that the interpreter lets through fail here rather than on a lent GPU. None spills registers to local
    memory, and on channels-last maps the depth-wise kernels move whole channel vectors: 128-bit loads of the
    shifted input, the gradients and a tap's packed weights, no 16-bit scalar global load or store."""
    sys.path.insert(0, 'tools')
    import kernel_report
    rows = kernel_report.report(90, torch.bfloat16) + kernel_report.report(80, torch.float32)
    assert len(rows) == 24 and {r['triton_fn'] for r in rows} == {
        '_taps_kernel', '_taps_wgrad_kernel', '_fwd_kernel', '_grad_attn_kernel', '_grad_value_kernel'}
    assert all(r['spill_bytes'] in (0, None) for r in rows), rows  # None: no cuobjdump to read it
    for r in rows:
        if r['layout'] == 'channels-last' and r['memory']:
            loads = set(r['memory'])
            assert 'LDG.E.128' in loads and not loads & {'LDG.E.U16', 'STG.E.U16'}, r
