"""The fused Triton aggregation kernels: checked on the CPU through Triton's interpreter (so CI runs them without a
GPU), and on CUDA against the PyTorch formulation when a GPU is present."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from overlock_core.ops import na2d_av, triton_av
from overlock_core.ops.config import KERNELS
from triton_marks import OLD_INTERPRETER, needs_cuda, needs_triton


# Run in a fresh interpreter: TRITON_INTERPRET must be set before the kernels are defined. The kernels then serve
# CPU tensors, so na2d_av and kernel_av dispatch to them; the references are float64 loops and autograd.
INTERPRETED = textwrap.dedent('''
    import torch
    from overlock_core.ops import kernel_av, na2d_av, na2d_av_reference, rpb_bias, triton_av
    assert triton_av.available(torch.zeros(1))
    torch.manual_seed(0)
    D = torch.float64
    for n, c, h, w, k, layout in [(2, 5, 9, 11, 5, 'contmix'), (3, 3, 7, 7, 7, 'nchw'), (1, 3, 13, 14, 13, 'contmix'),
                                  (1, 40, 6, 9, 3, 'nchw'), (2, 3, 6, 8, 5, 'contmix')]:
        a = torch.randn(n, h, w, k * k).softmax(-1)
        attn = (a.permute(0, 3, 1, 2) if layout == 'contmix' else a.permute(0, 3, 1, 2).contiguous()).requires_grad_()
        value = torch.randn(n, w, c, h).permute(0, 2, 3, 1).requires_grad_()  # non-contiguous values
        g = torch.randn(n, c, h, w)
        out = na2d_av(attn, value, k)
        got = torch.autograd.grad(out, (attn, value), g)
        ad, vd = attn.detach().to(D).requires_grad_(), value.detach().to(D).requires_grad_()
        ref = na2d_av_reference(ad, vd, k)
        want = torch.autograd.grad(ref, (ad, vd), g.to(D))
        for x, y in zip((out,) + got, (ref,) + want):
            torch.testing.assert_close(x.to(D), y, rtol=1e-5, atol=1e-5)
    b, gr, d, h, w, k = 2, 2, 3, 7, 8, 5  # ContMix's whole dynamic step through the kernels
    leaves = [torch.randn(*s, dtype=D, requires_grad=True) for s in
              [(b, gr, h * w, d), (b, gr, d, k * k), (gr, 2 * k - 1, 2 * k - 1), (k * k,), (b * gr, 4, h, w)]]
    q, kw, rpb, pb, value = [t.detach().float().requires_grad_() for t in leaves]
    out = kernel_av(q, kw, rpb, pb, value, k)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, kw, rpb, pb, value), grad)
    attn = (leaves[0] @ leaves[1] + rpb_bias(leaves[2], h, w) + leaves[3]).softmax(-1)
    ref = na2d_av_reference(attn.reshape(b * gr, h, w, k * k).permute(0, 3, 1, 2), leaves[4], k)
    want = torch.autograd.grad(ref, leaves, grad.to(D))
    for x, y in zip((out,) + got, (ref,) + want):
        torch.testing.assert_close(x.to(D), y, rtol=1e-4, atol=1e-5)
    calls, av_forward = [], triton_av.av_forward  # compiled, kernel_av still reaches the kernels (custom operator)
    triton_av.av_forward = lambda *a: calls.append(1) or av_forward(*a)
    compiled = torch.compile(lambda *t: kernel_av(*t, k), backend='aot_eager', fullgraph=True)
    out_c = compiled(q, kw, rpb, pb, value)
    got_c = torch.autograd.grad(out_c, (q, kw, rpb, pb, value), grad)
    assert calls, 'compiled kernel_av did not call the Triton kernels'
    for x, y in zip((out_c,) + got_c, (out,) + got):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    print('ok')
''')


@needs_triton
@pytest.mark.skipif(OLD_INTERPRETER, reason="Triton < 3.8's interpreter fails on numpy >= 2.4")
def test_triton_kernels_in_interpreter():
    """Forward, grad_attn and grad_value of the fused kernels equal the float64 definition on odd shapes (K 3 to 13,
    maps barely wider than K or narrower than 2K - 1, both attn layouts, strided values), and kernel_av through them
    equals the composite, also compiled."""
    env = dict(os.environ, TRITON_INTERPRET='1', OVERLOCK_TRITON='1')
    res = subprocess.run([sys.executable, '-c', INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith('ok'), res.stderr[-3000:]


def test_triton_switch(monkeypatch):
    """KERNELS.triton_av=False (OVERLOCK_TRITON=0) sends GPU tensors to the PyTorch formulation; CPU tensors never
    take the kernels."""
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert not triton_av.available(torch.zeros(1))
    monkeypatch.setattr(KERNELS, 'triton_av', False)
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    assert not triton_av.available(torch.zeros(1))


@needs_cuda
@pytest.mark.parametrize('h,w,k', [(14, 14, 13), (7, 7, 7), (50, 80, 13), (25, 40, 7), (9, 37, 5)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_definition(h, w, k, dtype):
    n, c = 6, 16
    attn = torch.randn(n, h, w, k * k, device='cuda').softmax(-1).to(dtype).permute(0, 3, 1, 2).requires_grad_()
    value = torch.randn(n, c, h, w, device='cuda', dtype=dtype, requires_grad=True)
    g = torch.randn(n, c, h, w, device='cuda', dtype=dtype)
    out = na2d_av(attn, value, k)
    got = torch.autograd.grad(out, (attn, value), g)
    ad, vd = [t.detach().double().cpu().requires_grad_() for t in (attn, value)]
    ref = na2d_av(ad, vd, k)  # the PyTorch formulation, float64 on the CPU (exact against the definition)
    want = torch.autograd.grad(ref, (ad, vd), g.double().cpu())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for x, y in zip((out,) + got, (ref,) + want):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double().cpu(), y, **tol)


@needs_cuda
def test_triton_cuda_model_matches_pytorch_formulation(monkeypatch):
    """A whole training step on CUDA: the Triton kernels, the PyTorch formulation and the paper-form modules give
    the same outputs and gradients (fp32, TF32 off): the lean recomputing functions run on CUDA too."""
    from overlock_core.accel import AccelConfig, accelerate
    from overlock_core.models import OverLoCK
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    model = OverLoCK('test', num_classes=5).cuda().train()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    results = []
    for flag, accel in (('1', AccelConfig()), ('0', AccelConfig()), ('1', None)):  # kernels, PyTorch, paper form
        monkeypatch.setattr(KERNELS, 'triton_av', flag == '1')
        accelerate(model, accel)
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        results.append((out, grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(results[0][0], out, rtol=1e-4, atol=1e-4)
        for a, b in zip(results[0][1], grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
