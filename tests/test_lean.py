"""The accelerated forms (``overlock_core.accel``): recomputing autograd functions are exact, update BatchNorm
statistics once, keep far fewer bytes than plain autograd, and give the model the same outputs and gradients as the
paper-form modules; ``accelerate`` and ``restore`` swap forms without touching the state_dict."""
import copy

import pytest
import torch
import torch.nn as nn

from overlock_core.accel import AccelConfig, accelerate, accelerated, resolve, restore
from overlock_core.models import OverLoCK
from overlock_core.ops.config import KERNELS
from overlock_core.models.layers import DynamicConvBlock, RepConvBlock
from overlock_core.ops import (bn_act, bn_branch_sum, conv_mlp, gated_bn_conv, kernel_av, na2d_av_reference,
                               rpb_bias)

D = torch.float64


def _bn(c, momentum=0.1):
    bn = nn.BatchNorm2d(c, momentum=momentum).to(D).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def _leaf(*shape):
    return torch.randn(*shape, dtype=D, requires_grad=True)


def _use_path(path, monkeypatch):
    """Make kernel_av take ``path``: the fused C++ kernels (which must build here), the grouped or the tiled
    PyTorch formulation."""
    from overlock_core.ops import cpu_ext, neighborhood
    if path == 'fused':
        if not cpu_ext.enabled():
            pytest.skip('the fused CPU kernels are switched off (OVERLOCK_CPU_EXT=0)')
        assert cpu_ext.load() is not None, 'the fused CPU kernels did not build'
    else:
        monkeypatch.setattr(KERNELS, 'cpu_ext', False)
        monkeypatch.setattr(neighborhood, 'MAX_GROUPS', 10 ** 6 if path == 'grouped' else 0)


@pytest.mark.parametrize('path,h,w', [('grouped', 7, 8), ('grouped', 5, 5), ('tiled', 7, 8), ('fused', 7, 8),
                                      ('fused', 9, 5)])
def test_kernel_av_matches_composite(path, h, w, monkeypatch):
    """softmax(q.kw + relative-position bias) aggregated over clamped windows, the kernel recomputed in the backward:
    output and every gradient (the bias table and projection bias included) equal autograd through the composite,
    on the tiled path, the grouped one (pixels reordered by window; a map as wide as K: one window) and the fused
    C++ kernels."""
    _use_path(path, monkeypatch)
    b, g, d, k = 2, 2, 3, 5
    q, kw, rpb, pb = _leaf(b, g, h * w, d), _leaf(b, g, d, k * k), _leaf(g, 2 * k - 1, 2 * k - 1), _leaf(k * k)
    value = _leaf(b * g, 4, h, w)

    def composite(q, kw, rpb, pb, value):
        attn = (q @ kw + rpb_bias(rpb, h, w) + pb).softmax(-1)
        return na2d_av_reference(attn.reshape(b * g, h, w, k * k).permute(0, 3, 1, 2), value, k)

    inputs = (q, kw, rpb, pb, value)
    from overlock_core.ops.neighborhood import _kernel_av_path
    assert _kernel_av_path(value, k) == {'tiled': 'plain'}.get(path, path)
    out = kernel_av(*inputs, k)
    torch.testing.assert_close(out, composite(*inputs), rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(composite(*inputs), inputs, grad)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt, rtol=0, atol=1e-11)
    small = (_leaf(1, 2, 16, 2), _leaf(1, 2, 2, 9), _leaf(2, 5, 5), _leaf(9), _leaf(2, 3, 4, 4))
    assert torch.autograd.gradcheck(lambda *t: kernel_av(*t, 3), small)


@pytest.mark.parametrize('path', ['grouped', 'tiled', 'fused'])
def test_kernel_av_gradients_of_some_inputs(path, monkeypatch):
    """Only the inputs that need a gradient get one (the others' products are skipped), and those equal autograd
    through the composite."""
    _use_path(path, monkeypatch)
    b, g, d, h, w, k = 2, 2, 3, 7, 8, 5
    shapes = [(b, g, h * w, d), (b, g, d, k * k), (g, 2 * k - 1, 2 * k - 1), (k * k,), (b * g, 4, h, w)]
    for mask in [(1, 1, 0, 0, 0), (0, 1, 1, 1, 0), (1, 0, 0, 0, 1), (0, 0, 1, 0, 0)]:
        q, kw, rpb, pb, value = ts = [torch.randn(*s, dtype=D, requires_grad=bool(m)) for s, m in zip(shapes, mask)]
        wanted = [t for t in ts if t.requires_grad]
        out = kernel_av(q, kw, rpb, pb, value, k)
        attn = (q @ kw + rpb_bias(rpb, h, w) + pb).softmax(-1)
        ref = na2d_av_reference(attn.reshape(b * g, h, w, k * k).permute(0, 3, 1, 2), value, k)
        grad = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, wanted, grad), torch.autograd.grad(ref, wanted, grad)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)



@pytest.mark.parametrize('path', ['grouped', 'tiled', 'fused'])
def test_kernel_av_custom_ops_for_the_compiler(path, monkeypatch):
    """The operators compiled graphs call (torch.library.opcheck: fake shapes and strides, schema, autograd,
    traced forward and backward against eager), on every path and with a channels-last value map."""
    _use_path(path, monkeypatch)
    b, g, d, h, w, k = 2, 2, 3, 7, 8, 5
    value = _leaf(b * g, 4, h, w).detach().to(memory_format=torch.channels_last).requires_grad_()
    args = (_leaf(b, g, h * w, d), _leaf(b, g, d, k * k), _leaf(g, 2 * k - 1, 2 * k - 1), _leaf(k * k), value, k)
    torch.library.opcheck(torch.ops.overlock.kernel_av, args)
    grad = torch.randn(b * g, 4, h, w, dtype=D)
    torch.library.opcheck(torch.ops.overlock.kernel_av_backward,
                          (*(t.detach() for t in args[:5]), grad, k, [True, False, True, True, True]))

@pytest.mark.parametrize('c,k,h,w', [(16, 13, 14, 15), (8, 5, 9, 7), (14, 7, 7, 9), (10, 17, 17, 18), (5, 3, 4, 6)])
def test_fused_kernel_av_equals_the_pytorch_formulation(c, k, h, w, monkeypatch):
    """The fused C++ kernels at the variants' head widths (compiled for 16, 14, 10, 8 channels; any other at run
    time), kernels wider than one vector of slots (K=17) and maps as wide as K along one side: output and every
    gradient equal the PyTorch formulation's in float64."""
    from overlock_core.ops import cpu_ext
    _use_path('fused', monkeypatch)
    b, g, d = 2, 3, 16
    leaves = [_leaf(b, g, h * w, d), _leaf(b, g, d, k * k), _leaf(g, 2 * k - 1, 2 * k - 1), _leaf(k * k),
              _leaf(b * g, c, h, w)]
    grad = torch.randn(b * g, c, h, w, dtype=D)
    results = []
    for flag in ('1', '0'):
        monkeypatch.setattr(KERNELS, 'cpu_ext', flag == '1')
        out = kernel_av(*leaves, k)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    assert cpu_ext.enabled() is False
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_fused_kernels_that_do_not_build_leave_the_pytorch_formulation(monkeypatch):
    """A failed build (no compiler, a broken toolchain) warns once, naming the cause, and returns None: kernel_av
    then runs its PyTorch formulation."""
    from torch.utils import cpp_extension
    from overlock_core.ops import cpu_ext

    def broken(*args, **kwargs):
        raise RuntimeError('Error building extension: g++: command not found')
    monkeypatch.setattr(cpp_extension, 'load', broken)
    with pytest.warns(UserWarning, match='could not be built.*g\\+\\+: command not found'):
        assert cpu_ext.load.__wrapped__() is None


def test_kernel_av_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='do not fit K=5'):
        kernel_av(torch.randn(1, 2, 16, 3), torch.randn(1, 2, 3, 9), torch.randn(2, 9, 9), torch.randn(25),
                  torch.randn(2, 4, 4, 4), 5)


@pytest.mark.parametrize('act', ['gelu', 'silu'])
def test_bn_act_gradcheck_and_running_stats(act):
    bn, ref = _bn(4), _bn(4)
    ref.load_state_dict(bn.state_dict())
    x = _leaf(3, 4, 5, 6)
    y = bn_act(x, bn, act)
    want = getattr(nn.functional, act)(ref(x))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-13)
    for name, buf in ref.named_buffers():  # one update per call, as the module does
        torch.testing.assert_close(getattr(bn, name), buf, rtol=0, atol=0, msg=name)
    assert torch.autograd.gradcheck(lambda x, w, b: bn_act(x, bn, act), (x, bn.weight, bn.bias))


@pytest.mark.parametrize('act', ['gelu', 'silu'])
def test_dw_bn_act_conv_is_bitwise_the_plain_chain(act):
    """The fusion chain (DW3x3, BN, act, 1x1 conv) keeping x alone: fp32 output, every gradient and the running
    statistics equal the plain modules' bit for bit (the same kernels in the same order, so seeded runs are
    unchanged), and a float64 gradcheck passes."""
    from overlock_core.accel import Chain
    from overlock_core.models.layers import DWConv2d
    from overlock_core.ops import dw_bn_act_conv
    chain = Chain(DWConv2d(6, 3), nn.BatchNorm2d(6), nn.GELU() if act == 'gelu' else nn.SiLU(), nn.Conv2d(6, 4, 1))
    plain = copy.deepcopy(chain)
    plain.lean = False
    x = torch.randn(2, 6, 9, 10, requires_grad=True)
    outs, grads, kept = [], [], []
    for m in (chain, plain):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = m(x)
        kept.append({id(t): t.numel() for t in saved if t.dim() == 4 and t.shape[0] == 2})
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                         [x, *m.parameters()]))
    assert torch.equal(outs[0], outs[1])
    assert len(kept[0]) == 1 and len(kept[1]) == 4  # x; plain autograd also the BN input, the act input and output
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    for (name, a), b in zip(chain.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
    dw, bn, conv = chain[0].double(), _bn(6), chain[3].double()
    xd = _leaf(2, 6, 5, 4)
    assert torch.autograd.gradcheck(lambda x, *p: dw_bn_act_conv(x, dw, bn, act, conv),
                                    (xd, dw.weight, dw.bias, bn.weight, bn.bias, conv.weight, conv.bias))


@pytest.mark.parametrize('keep_first', [True, False])
def test_bn_branch_sum_gradcheck_and_cumulative_momentum(keep_first, monkeypatch):
    """The DilatedReparamBlock training form: sum of BN(dw conv) branches, dilated ones included; momentum=None
    (cumulative average) is honoured; the first branch's output kept (small maps) or recomputed."""
    from overlock_core.ops import recompute
    monkeypatch.setattr(recompute, 'KEEP_FIRST', recompute.KEEP_FIRST if keep_first else 0)
    specs = ((7, 1), (5, 1), (3, 2), (3, 3))
    weights = [_leaf(3, 1, k, k) for k, _ in specs]
    bns = [_bn(3, momentum=None) for _ in specs]
    refs = copy.deepcopy(bns)
    x = _leaf(2, 3, 9, 10)
    out = bn_branch_sum(x, weights, [d for _, d in specs], bns)
    want = sum(bn(nn.functional.conv2d(x, w, None, padding=d * (w.shape[-1] // 2), dilation=d, groups=3))
               for bn, w, (_, d) in zip(refs, weights, specs))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    for bn, ref in zip(bns, refs):
        for name, buf in ref.named_buffers():
            torch.testing.assert_close(getattr(bn, name), buf, rtol=0, atol=1e-15, msg=name)
    params = [x, *weights, *[bn.weight for bn in bns], *[bn.bias for bn in bns]]
    n = len(specs)
    assert torch.autograd.gradcheck(
        lambda x, *p: bn_branch_sum(x, p[:n], [d for _, d in specs], bns), params, atol=1e-8)


def test_bn_branch_sum_with_layer_norm():
    """The LayerNorm in front of a DilatedReparamBlock, run inside the lean function: fp32 output and gradients equal
    the unfused function's bit for bit (the module's own kernels), its output is not kept, and a float64 gradcheck
    passes; under bf16 autocast it runs in fp32 like the module."""
    from timm.layers import LayerNorm2d
    norm = LayerNorm2d(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    specs = ((5, 1), (3, 2))
    weights = [torch.randn(4, 1, k, k, requires_grad=True) for k, _ in specs]
    dil = [d for _, d in specs]
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    results = []
    for fused in (True, False):
        bns = [nn.BatchNorm2d(4).train() for _ in specs]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = bn_branch_sum(x, weights, dil, bns, norm) if fused else bn_branch_sum(norm(x), weights, dil, bns)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [x, norm.weight, norm.bias, *weights])
        results.append((out, grads, sum(t.numel() for t in saved if t.numel() == x.numel())))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    # x and (a map this small: KEEP_FIRST) the first branch's output, not also the LayerNorm output
    assert results[0][2] == 2 * x.numel() and results[1][2] == 3 * x.numel()
    nd, xd, wd = copy.deepcopy(norm).double(), _leaf(2, 4, 5, 6), [_leaf(4, 1, k, k) for k, _ in specs]
    bns = [_bn(4) for _ in specs]
    assert torch.autograd.gradcheck(lambda x, lw, lb, *w: bn_branch_sum(x, w, dil, bns, nd),
                                    (xd, nd.weight, nd.bias, *wd), atol=1e-8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = bn_branch_sum(x, weights, dil, [nn.BatchNorm2d(4).train() for _ in specs], norm)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), results[1][0], rtol=0.05, atol=0.1)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and norm.weight.grad is not None
    norm.weight.grad = None  # an input that needs no gradient (a frozen stem): the LayerNorm's still flow
    bn_branch_sum(x.detach(), weights, dil, [nn.BatchNorm2d(4).train() for _ in specs], norm).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('residual,scaled,c,h,w,grouped', [
    (False, False, 3, 5, 6, False), (True, True, 3, 5, 6, False),
    (True, False, 16, 2, 2, False),  # the one-matmul weight gradient
    (False, True, 3, 5, 6, True), (True, False, 3, 5, 6, True)])  # images in groups of 2 and 1 (CPU cache path)
def test_conv_mlp_gradcheck(residual, scaled, c, h, w, grouped, monkeypatch):
    """[x * scale,] 1x1 conv, GELU, [u +] DW3x3, GRN, 1x1 conv, keeping x and one hidden map: exact against the
    composite, also when the batch runs through the chain in groups of images."""
    from overlock_core.ops import grn, recompute
    hid, n = 5, 3
    if grouped:  # a budget of two images' hidden maps
        monkeypatch.setattr(recompute, 'CHAIN_BYTES', 2 * hid * h * w * 8)
    params = (_leaf(hid, c, 1, 1), _leaf(hid), _leaf(hid, 1, 3, 3), _leaf(hid), _leaf(1, hid, 1, 1),
              _leaf(1, hid, 1, 1), _leaf(c, hid, 1, 1), _leaf(c))
    x, scale = _leaf(n, c, h, w), (_leaf(n, c, 1, 1) if scaled else None)
    assert len(recompute.image_groups(x, hid)) == (2 if grouped else 1)

    def composite(x, w1, b1, wdw, bdw, gamma, beta, w2, b2):
        u = nn.functional.gelu(nn.functional.conv2d(x if scale is None else x * scale, w1, b1))
        h = nn.functional.conv2d(u, wdw, bdw, padding=1, groups=hid) + (u if residual else 0)
        return nn.functional.conv2d(grn(h, gamma, beta), w2, b2)

    keep = not (grouped and residual)  # one grouped case keeps no hidden map (lean='max')
    out = conv_mlp(x, *params, residual=residual, scale=scale, keep_hidden=keep)
    torch.testing.assert_close(out, composite(x, *params), rtol=0, atol=1e-12)
    inputs = (x, *params) + ((scale,) if scaled else ())
    assert torch.autograd.gradcheck(
        lambda *t: conv_mlp(*t[:9], residual=residual, scale=t[9] if scaled else None, keep_hidden=keep), inputs)


def test_gated_bn_conv_gradcheck():
    bn, ref = _bn(4), _bn(4)
    ref.load_state_dict(bn.state_dict())
    conv = nn.Conv2d(4, 6, 1).to(D)
    y, s, gate = _leaf(2, 4, 5, 5), _leaf(2, 4, 1, 1), _leaf(2, 4, 5, 5)
    torch.testing.assert_close(gated_bn_conv(y, s, gate, bn, conv), conv(ref(y * s * gate)), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: gated_bn_conv(*t[:3], bn, conv),
                                    (y, s, gate, bn.weight, bn.bias, conv.weight, conv.bias))


def _run(module, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(*inputs)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, [t.grad for t in inputs], grads, dict(module.named_buffers())


def _lean_pair(module, lean=True):
    """(the accelerated form at ``lean``, the paper form) of ``module``, same weights."""
    return accelerate(copy.deepcopy(module), AccelConfig(lean=lean)), module


@pytest.mark.parametrize('kind', ['rep', 'dynamic', 'model'])
def test_lean_equals_plain_modules(kind):
    """Same outputs, input and parameter gradients and BatchNorm statistics as the paper-form modules (float64)."""
    torch.manual_seed(0)
    if kind == 'rep':
        module, inputs = RepConvBlock(16, 17, ls_init_value=1.0), [torch.randn(2, 16, 11, 13)]
    elif kind == 'dynamic':
        module = DynamicConvBlock(32, 12, 7, 5, 2)
        inputs = [torch.randn(2, 32, 9, 9), torch.randn(2, 12, 9, 9), torch.randn(2, 12, 9, 9)]
    else:
        module, inputs = OverLoCK('test', num_classes=5), [torch.randn(2, 3, 64, 64)]
    module = module.to(D).train()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lean, plain = _lean_pair(module)
    a, b = _run(lean, [t.to(D) for t in inputs]), _run(plain, [t.to(D) for t in inputs])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)
    scale = max(g.abs().max().item() for g in b[2].values() if g is not None)
    for name, g in b[2].items():
        torch.testing.assert_close(a[2][name], g, rtol=1e-8, atol=1e-11 * scale, msg=name)
    for name, buf in b[3].items():
        torch.testing.assert_close(a[3][name], buf, rtol=0, atol=1e-12, msg=name)


def _saved_bytes(module, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def test_lean_halves_the_kept_activations():
    """What autograd keeps between forward and backward (parameters excluded), batch 2 at 128x128: about half of the
    plain modules' (the aggregation, which never keeps its kernel, is the same in both)."""
    model = OverLoCK('t', num_classes=10).train()
    x = torch.randn(2, 3, 128, 128)
    lean, plain = _lean_pair(model)
    assert _saved_bytes(accelerate(copy.deepcopy(model), AccelConfig(lean=False)), x) > 0.9 * _saved_bytes(plain, x)
    assert _saved_bytes(lean, x) < 0.55 * _saved_bytes(plain, x)


def test_lean_under_bf16_autocast_matches_plain():
    """Under CPU bf16 autocast the recomputing functions run in bf16 (BatchNorm statistics and GRN norms in fp32)
    and agree with the plain modules to bf16 precision; parameter gradients stay fp32."""
    torch.manual_seed(0)
    for module, inputs in ((RepConvBlock(16, 13, ls_init_value=1.0), [torch.randn(2, 16, 16, 16)]),
                           (DynamicConvBlock(32, 12, 7, 5, 2),
                            [torch.randn(2, 32, 9, 9), torch.randn(2, 12, 9, 9), torch.randn(2, 12, 9, 9)])):
        lean, plain = _lean_pair(module.train())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            a, b = _run(lean, inputs), _run(plain, inputs)
        torch.testing.assert_close(a[0].float(), b[0].float(), rtol=0.05, atol=0.05)
        for name, g in b[2].items():
            assert a[2][name].dtype == torch.float32, name
        ga = torch.cat([g.flatten() for g in a[2].values()])
        gb = torch.cat([g.flatten() for g in b[2].values()])
        assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.99


def test_lean_max_recomputes_the_hidden_map_bit_for_bit():
    """lean='max' keeps no hidden-width MLP map (the first 1x1 conv runs again in the backward): outputs, gradients
    and BatchNorm statistics equal lean=True's bit for bit, and it keeps less; bad values are refused."""
    torch.manual_seed(0)
    model = OverLoCK('test', num_classes=5).train()
    lean, most = _lean_pair(model)[0], _lean_pair(model, 'max')[0]
    x = torch.randn(2, 3, 64, 64)
    a, b = _run(lean, [x]), _run(most, [x])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    for name, g in a[2].items():
        assert g is None and b[2][name] is None or torch.equal(g, b[2][name]), name
    for name, buf in a[3].items():
        assert torch.equal(buf, b[3][name]), name
    big, x = accelerate(OverLoCK('t', num_classes=10).train()), torch.randn(2, 3, 96, 96)
    kept = _saved_bytes(big, x)
    accelerate(big, AccelConfig(lean='max'))
    assert _saved_bytes(big, x) < 0.9 * kept  # the hidden MLP maps are a sizeable share of what lean=True keeps
    with pytest.raises(ValueError, match='lean must be'):
        AccelConfig(lean='yes')


def test_models_are_built_in_the_paper_form_and_launchers_accelerate_on_cpus():
    """timm builds the paper form; the launchers' 'auto' accelerates on CPUs (lean for classifiers, 'max' for dense
    backbones, where activation memory binds) and leaves GPU models in the paper form; an explicit choice wins and
    a bad one is a clear error."""
    import timm

    import overlock_core.mm  # noqa: F401  (registers OverLoCKBackbone)
    from mmengine.registry import MODELS
    from overlock_core.accel import auto_config
    from overlock_core.models import layers

    plain = timm.create_model('test_overlock', features_only=True)
    assert accelerated(plain) is None
    assert not any(type(m).__module__ == 'overlock_core.accel' for m in plain.modules())
    assert type(plain.model.blocks1[0]) is layers.RepConvBlock
    assert auto_config(device='cpu') == AccelConfig(lean=True)
    assert auto_config(dense=True, device='cpu') == AccelConfig(lean='max')
    assert auto_config(device='cuda') is None
    assert resolve('auto', device='cuda:0') is None and resolve('off') is None and resolve(False) is None
    assert resolve(dict(lean='max')) == AccelConfig(lean='max')
    for bad, match in (('fast', 'accel must be'), (dict(lean=1, kernels=2), 'unknown accel option'),
                       (dict(lean='yes'), 'lean must be')):
        with pytest.raises(ValueError, match=match):
            resolve(bad)
    auto = 'cuda' if torch.cuda.is_available() else 'cpu'
    built = MODELS.build(dict(type='OverLoCKBackbone', arch='test', dense='seg'))
    assert accelerated(built) == auto_config(dense=True, device=auto)
    assert accelerated(MODELS.build(dict(type='OverLoCKBackbone', arch='test', dense='det', accel='off'))) is None
    assert accelerated(MODELS.build(dict(type='OverLoCKBackbone', arch='test', dense='det',
                                         accel=dict(lean=False)))) == AccelConfig(lean=False)


def test_accelerate_and_restore_keep_the_state_dict():
    """accelerate swaps every paper-form module (the stem included) and restore swaps them all back: same
    state_dict keys and tensors throughout, the parameters the optimiser holds stay the same objects."""
    from overlock_core import accel
    model = OverLoCK('test', num_classes=5)
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    accelerate(model, AccelConfig(lean='max'))
    kinds = {type(m) for m in model.modules()}
    assert set(accel.FORMS.values()) - {accel.Chain} | {accel.ChannelsLastStem} <= kinds
    assert not kinds & set(accel.FORMS)
    assert accelerated(model) == AccelConfig(lean='max')
    for m in (model, restore(model)):
        assert list(m.parameters()) == params
        assert m.state_dict().keys() == state.keys()
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert accelerated(model) is None and not {type(m) for m in model.modules()} & set(accel.PLAIN)
    with pytest.raises(TypeError, match='AccelConfig'):
        accelerate(model, dict(lean=True))


def test_mlp_without_autograd_runs_in_image_groups(monkeypatch):
    """Inference: on large CPU maps the MLP chain runs group by group of images (hidden maps in cache); the block's
    output equals the one-batch output."""
    from overlock_core.ops import recompute
    torch.manual_seed(0)
    block = accelerate(RepConvBlock(8, 5)).eval()
    for name, p in block.named_parameters():
        if name.endswith(('gamma', 'beta')):
            nn.init.normal_(p)  # GRN starts as the identity
    x = torch.randn(5, 8, 9, 9)
    with torch.no_grad():
        whole = block(x)
        monkeypatch.setattr(recompute, 'CHAIN_BYTES', 2 * 32 * 9 * 9 * 4)  # two images' hidden maps
        assert len(recompute.image_groups(x, 32)) == 3
        grouped = block(x)
    torch.testing.assert_close(grouped, whole, rtol=1e-6, atol=1e-6)
