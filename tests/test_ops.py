"""The aggregation operator against its definition: brute-force loop, unfold formulation, float64 gradcheck."""
import pytest
import torch

from overlock_core.models.layers import DynamicConvBlock
from overlock_core.ops import na2d_av, na2d_av_reference, na2d_av_unfold, rpb_bias, window_starts

SHAPES = [(14, 20, 13), (14, 15, 13), (13, 13, 13), (9, 30, 5), (7, 7, 7), (13, 17, 13), (6, 11, 3), (9, 37, 5), (15, 40, 13)]


def _attn(n, h, w, k, layout, **kw):
    """Soft-maxed window weights (N, K*K, H, W): contiguous, or ContMix's layout (a view of (N, H, W, K*K))."""
    a = torch.randn(n, h, w, k * k, dtype=torch.float64).softmax(-1).permute(0, 3, 1, 2)
    return (a if layout == 'contmix' else a.contiguous()).requires_grad_(kw.get('requires_grad', False))


@pytest.mark.parametrize('layout', ['nchw', 'contmix'])
@pytest.mark.parametrize('h,w,k', SHAPES)
def test_na2d_matches_reference_and_unfold(h, w, k, layout):
    """Every path (tiles, per-window groups, row slabs) on both attn layouts."""
    attn = _attn(3, h, w, k, layout)
    value = torch.randn(3, 5, h, w, dtype=torch.float64)
    ref = na2d_av_reference(attn, value, k)
    torch.testing.assert_close(na2d_av(attn, value, k), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(na2d_av_unfold(attn, value, k), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('layout', ['nchw', 'contmix'])
@pytest.mark.parametrize('h,w,k', [(5, 4, 3), (3, 7, 3), (5, 5, 5), (3, 19, 3), (8, 9, 7)])
def test_na2d_gradcheck(h, w, k, layout):
    attn = _attn(2, h, w, k, layout, requires_grad=True)
    value = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v: na2d_av(a, v, k), (attn, value))


def test_na2d_grads_match_unfold():
    attn = torch.randn(2, 49, 9, 12, requires_grad=True)
    value = torch.randn(2, 4, 9, 12, requires_grad=True)
    g = torch.randn(2, 4, 9, 12)
    ga, gv = torch.autograd.grad(na2d_av(attn, value, 7), (attn, value), g)
    ra, rv = torch.autograd.grad(na2d_av_unfold(attn, value, 7), (attn, value), g)
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-5)


def test_window_starts_clamp_inside_map():
    assert window_starts(10, 5).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match='at least'):
        window_starts(4, 5)
    with pytest.raises(ValueError, match='na2d_av expects'):
        na2d_av(torch.randn(1, 9, 4, 4), torch.randn(1, 2, 4, 5), 3)


@pytest.mark.parametrize('h,w,k', [(14, 20, 13), (13, 13, 13), (9, 30, 5), (7, 7, 7)])
def test_rpb_gather_uses_true_displacement(h, w, k):
    table = torch.randn(2, 2 * k - 1, 2 * k - 1)
    bias = rpb_bias(table, h, w)
    sh, sw = window_starts(h, k).tolist(), window_starts(w, k).tolist()
    for i in range(h):
        for j in range(w):
            for a in range(k):
                for b in range(k):
                    want = table[:, sh[i] + a - i + k - 1, sw[j] + b - j + k - 1]
                    assert torch.equal(bias[:, i * w + j, a * k + b], want)


def test_contmix_half_precision_stays_finite():
    """Under fp16/bf16 autocast the softmaxes and GRN run in fp32, so large activations do not overflow."""
    blk = DynamicConvBlock(32, 12, 7, 5, 2).eval()
    x, ctx = torch.randn(1, 32, 9, 9) * 300, torch.randn(1, 12, 9, 9) * 300
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, _ = blk(x, ctx, ctx)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        y32, _ = blk(x, ctx, ctx)
    assert y32.dtype == torch.float32 and torch.isfinite(y32).all()


@pytest.mark.parametrize('size', [9, 20])
def test_blocks_trace_without_graph_breaks(size):
    """torch.compile sees each block (ContMix and its autograd operator included) as one graph, also on maps over
    16x16 where the eager CPU paths (frequency-space backward, channels-last widened kernels) would be taken."""
    import torch._dynamo as dynamo
    from overlock_core.models.layers import RepConvBlock
    torch._dynamo.reset()
    x, ctx = torch.randn(1, 32, size, size), torch.randn(1, 12, size, size)
    assert dynamo.explain(DynamicConvBlock(32, 12, 7, 5, 2))(x, ctx, ctx).graph_break_count == 0
    x = torch.randn(1, 16, size, size).to(memory_format=torch.channels_last)
    assert dynamo.explain(RepConvBlock(16, 13))(x).graph_break_count == 0



@pytest.mark.parametrize('k,d,cl', [(13, 1, True), (3, 7, False), (9, 2, False)])
def test_dw_conv2d_custom_ops_for_the_compiler(k, d, cl):
    """The operators compiled graphs call (torch.library.opcheck: fake shapes and strides, schema, autograd)."""
    from overlock_core.ops import dwconv  # noqa: F401  registers overlock::dw_conv2d
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    w = torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.overlock.dw_conv2d, (x, w, b, d))
    torch.library.opcheck(torch.ops.overlock.dw_conv2d_backward, (x.detach(), w.detach(), torch.randn_like(x), d,
                                                                 True, False))

@pytest.mark.parametrize('path', ['grouped', 'tiled'])
def test_na2d_both_paths_match_reference(path, monkeypatch):
    """Maps with few distinct windows aggregate per window, larger ones through banded tiles: both are exact."""
    from overlock_core.ops import neighborhood
    monkeypatch.setattr(neighborhood, 'MAX_GROUPS', 10 ** 6 if path == 'grouped' else 0)
    attn = torch.randn(2, 49, 11, 9, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 3, 11, 9, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(na2d_av(attn, value, 7), na2d_av_reference(attn, value, 7), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, v: na2d_av(a, v, 7), (attn, value))


# (batch, channels, H, W, K, dilation, bias): every weight-gradient path of dw_conv2d (grouped conv on small maps,
# FFT for large kernels on larger maps, PyTorch's on channels-last for small kernels) and both layouts
DW_SHAPES = [(2, 3, 9, 11, 11, 1, True), (2, 4, 20, 40, 13, 1, False), (1, 3, 40, 33, 17, 1, True),
             (2, 3, 40, 40, 3, 7, False), (2, 3, 12, 12, 13, 1, True), (2, 3, 30, 35, 9, 2, True),
             (2, 5, 16, 16, 7, 1, True), (1, 2, 18, 21, 5, 1, False), (2, 4, 9, 10, 3, 2, False),
             (1, 3, 12, 11, 3, 3, True)]


@pytest.mark.parametrize('b,c,h,w,k,d,bias', DW_SHAPES)
def test_dw_conv2d_matches_conv2d(b, c, h, w, k, d, bias):
    from overlock_core.ops import dw_conv2d
    x = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    bvec = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, weight) + ((bvec,) if bias else ())
    got = dw_conv2d(x, weight, bvec, d)
    ref = torch.nn.functional.conv2d(x, weight, bvec, padding=d * (k - 1) // 2, dilation=d, groups=c)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


# the layout and padding thresholds of ops/dwconv.py measured with AVX-512 and with AVX2 alone
ISA_THRESHOLDS = {'avx512': dict(NHWC_SPAN=14, DILATED_PAD=6, WIDEN={13: 15}, WGRAD_NHWC_PAD=None,
                                 GROUPED_WGRAD_MAP=None, NHWC_3X3_BACKWARD=False),
                  'avx2': dict(NHWC_SPAN=11, DILATED_PAD=4, WIDEN={}, WGRAD_NHWC_PAD=3, GROUPED_WGRAD_MAP=128 * 128,
                               NHWC_3X3_BACKWARD=True)}


@pytest.mark.parametrize('isa', sorted(ISA_THRESHOLDS))
@pytest.mark.parametrize('k,d,h,w,layout', [(13, 1, 17, 19, 'cl'), (3, 7, 17, 19, 'cl'), (9, 2, 17, 19, 'cl'),
                                             (13, 1, 14, 14, 'nchw'), (7, 2, 14, 14, 'nchw'), (3, 5, 12, 13, 'nchw'),
                                             (11, 1, 20, 18, 'nchw'), (3, 4, 20, 18, 'nchw'), (7, 2, 21, 17, 'cl'),
                                             (5, 1, 18, 20, 'nchw'), (3, 1, 9, 10, 'nchw')])
def test_dw_conv2d_channels_last_fast_paths(k, d, h, w, layout, isa, monkeypatch):
    """Either instruction set's thresholds, on any CPU: channels-last 13x13 kernels padded to 15x15 (``WIDEN``),
    wide kernels run channels-last (``NHWC_SPAN``), dilated ones padded by more than ``DILATED_PAD`` get the extra
    zeros up front, grouped weight gradients channels-last (``WGRAD_NHWC_PAD``) and on larger maps
    (``GROUPED_WGRAD_MAP``), 3x3 backwards channels-last (``NHWC_3X3_BACKWARD``): the same convolution and
    gradients, with and without autograd."""
    from overlock_core.ops import dw_conv2d, dwconv
    for name, value in ISA_THRESHOLDS[isa].items():
        monkeypatch.setattr(dwconv, name, value)
    fmt = torch.channels_last if layout == 'cl' else torch.contiguous_format
    x = torch.randn(2, 3, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
    weight = torch.randn(3, 1, k, k, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, weight, padding=d * (k - 1) // 2, dilation=d, groups=3)
    with torch.no_grad():
        torch.testing.assert_close(dw_conv2d(x, weight, None, d), ref, rtol=0, atol=1e-10)
    x.requires_grad_(), weight.requires_grad_()
    g = torch.randn_like(ref)
    got = torch.autograd.grad(dw_conv2d(x, weight, None, d), (x, weight), g)
    want = torch.autograd.grad(torch.nn.functional.conv2d(x, weight, padding=d * (k - 1) // 2, dilation=d, groups=3),
                               (x, weight), g)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


def test_dw_conv2d_gradcheck_fft_path():
    from overlock_core.ops import dw_conv2d
    x = torch.randn(1, 2, 17, 19, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 11, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, wt: dw_conv2d(a, wt, None, 1), (x, weight))


@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('h,w,specs', [(17, 23, ((7, 1), (3, 2), (5, 3))), (20, 18, ((17, 1), (3, 7), (9, 2)))])
def test_spectral_grads_match_autograd(h, w, specs, chunked, monkeypatch):
    """A DilatedReparamBlock's branch gradients in frequency space (one transform of the input, one inverse for
    the summed input gradient) equal autograd through the convolutions, odd sizes and dilations included; also
    with the inverse transforms in chunks (of a few channels, as on large maps)."""
    from overlock_core.ops import SpectralGrads, dwconv
    if chunked:
        monkeypatch.setattr(dwconv, 'IRFFT_BYTES', 5000)
    x = torch.randn(3, 4, h, w, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(4, 1, k, k, dtype=torch.float64, requires_grad=True) for k, _ in specs]
    gs = [torch.randn(3, 4, h, w, dtype=torch.float64) for _ in specs]
    out = sum((torch.nn.functional.conv2d(x, wt, padding=d * (wt.shape[-1] // 2), dilation=d, groups=4) * g).sum()
              for wt, (_, d), g in zip(ws, specs, gs))
    want = torch.autograd.grad(out, [x, *ws])
    spectral = SpectralGrads(x.detach(), [k for k, _ in specs], [d for _, d in specs])
    got = [spectral.add(wt.detach(), d, g, (True, True)) for wt, (_, d), g in zip(ws, specs, gs)]
    torch.testing.assert_close(spectral.input_grad(), want[0], rtol=0, atol=1e-11)
    for a, b in zip(got, want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_bn_branch_sum_spectral_path_matches_per_branch(monkeypatch):
    """bn_branch_sum on a map over 16x16 takes the frequency-space backward (with enough taps per transform; not
    with one image or small kernels: ``SpectralGrads.use``), 3x3 branches on small maps beside it per branch; its
    gradients equal the per-branch path's, and the LayerNorm's with it."""
    from timm.layers import LayerNorm2d
    from overlock_core.ops import SpectralGrads, bn_branch_sum, dwconv
    specs = ((13, 1), (5, 1), (3, 2), (3, 5))
    x = torch.randn(2, 3, 18, 21, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True) for k, _ in specs]
    norm = LayerNorm2d(3).double()
    assert SpectralGrads.use(x, [k for k, _ in specs])
    assert not SpectralGrads.use(x[:1], [9, 5, 3, 3]) and not SpectralGrads.use(x, [7, 5, 3, 3])
    sg = SpectralGrads(x.detach(), [k for k, _ in specs], [d for _, d in specs])
    assert sg.takes(13) and not sg.takes(3)  # this map is small: its 3x3 branches run per branch
    grads = []
    for spectral in (True, False):
        monkeypatch.setattr(dwconv.SpectralGrads, 'use', staticmethod(lambda *a, on=spectral: on))
        bns = [torch.nn.BatchNorm2d(3).double().train() for _ in specs]
        out = bn_branch_sum(x, ws, [d for _, d in specs], bns, norm)
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads.append(torch.autograd.grad((out * g).sum(), [x, *ws, norm.weight, *[bn.weight for bn in bns]]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_dw_conv2d_bf16_autocast_keeps_weight_grad_dtype():
    from overlock_core.ops import dw_conv2d
    x = torch.randn(1, 4, 20, 20, requires_grad=True)
    weight = torch.randn(4, 1, 13, 13, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = dw_conv2d(x, weight)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_grn_closed_form_backward():
    """GRN's hand-written backward equals autograd through the composite, including a map that is all zero."""
    from overlock_core.ops import grn
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[0, 1] = 0
    gamma = torch.randn(1, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grn, (x, gamma, beta))
    gx = torch.linalg.vector_norm(x, dim=(2, 3), keepdim=True)
    ref = torch.addcmul(beta, x, gamma * gx / (gx.mean(1, keepdim=True) + 1e-6) + 1)
    torch.testing.assert_close(grn(x, gamma, beta), ref)
    torch.testing.assert_close(grn(x.contiguous(memory_format=torch.channels_last), gamma, beta), ref)


def test_grn_channels_last_chunks(monkeypatch):
    """The chunked per-channel sums of channels-last maps (norms and the backward's sum of g * x; several chunks
    here) equal the full-size reductions, and the in-place forward equals the out-of-place one."""
    import importlib
    grn_mod = importlib.import_module('overlock_core.ops.grn')  # the module (the package exports the function)
    monkeypatch.setattr(grn_mod, 'CHUNK', 40)
    x, g = torch.randn(2, 6, 7, 5, dtype=torch.float64), torch.randn(2, 6, 7, 5, dtype=torch.float64)
    gamma, beta = torch.randn(1, 6, 1, 1, dtype=torch.float64), torch.randn(1, 6, 1, 1, dtype=torch.float64)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, g)]
    y, gx, mean = grn_mod.grn_forward(x, gamma, beta, 1e-6)
    y_cl, gx_cl, mean_cl = grn_mod.grn_forward(cl[0].clone(), gamma, beta, 1e-6, inplace=True)
    torch.testing.assert_close(y_cl, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_cl, gx, rtol=1e-12, atol=1e-12)
    want = grn_mod.grn_backward(g.clone(), x, gamma, gx, mean)
    got = grn_mod.grn_backward(cl[1].clone(), cl[0], gamma, gx, mean, inplace=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_residual_stream_keeps_fp32_under_bf16_autocast():
    """The in-place residual adds never narrow the stream: a bf16 branch added to an fp32 shortcut stays fp32."""
    from overlock_core.models.layers import RepConvBlock
    blk = RepConvBlock(16, 7, ls_init_value=1.0).train()
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = blk(x)
    assert y.dtype == torch.float32
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    y32 = blk(x)  # and in fp32 the in-place adds give the plain sum
    ref = blk.ls(blk.dwconv(x)) + blk.proj(blk.dwconv(x))
    torch.testing.assert_close(y32, ref)



def test_kernel_config_from_env_configure_and_using():
    """One object says which kernels the operators may use: it starts from the environment, ``using`` changes it for
    a block (the aggregation's path follows at once) and restores it, and an unknown option is refused."""
    import dataclasses

    from overlock_core.ops import cpu_ext
    from overlock_core.ops.config import KERNELS, KernelConfig, configure, using
    from overlock_core.ops.neighborhood import _kernel_av_path
    assert KernelConfig.from_env({}) == KernelConfig(cpu_ext=True, triton_av=True, triton_dwconv=None,
                                                     triton_drb=None)
    env = {'OVERLOCK_CPU_EXT': '0', 'OVERLOCK_TRITON': '0', 'OVERLOCK_TRITON_DWCONV': '1', 'OVERLOCK_TRITON_DRB': '0'}
    assert KernelConfig.from_env(env) == KernelConfig(cpu_ext=False, triton_av=False, triton_dwconv=True,
                                                      triton_drb=False)
    before = dataclasses.replace(KERNELS)
    value = torch.randn(2, 4, 9, 11)
    with using(cpu_ext=False):
        assert cpu_ext.get() is None and _kernel_av_path(value, 5) != 'fused'
    assert KERNELS == before
    with pytest.raises(ValueError, match='unknown kernel option'):
        configure(fast_kernels=True)
