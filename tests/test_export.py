"""Tracing and export: torch.fx symbolic tracing as timm's fx tests run it (eval forward exact, training backward),
the plain-operator export form against the eager model, and ONNX export through tools/export_onnx.py checked in
onnxruntime."""
import copy
import importlib
import importlib.util
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import get_notrace_functions, get_notrace_modules

import overlock_core  # noqa: F401  registers the timm models
from overlock_core import accel
from overlock_core.accel import accelerate, accelerated
from overlock_core.export import (adaptive_avg_pool2d_plain, min_input_size, plain_forward, plain_ops,
                                  plain_ops_active, prepare_for_export)
from overlock_core.models.layers import contmix_size
from overlock_core.ops import dwconv, neighborhood
from overlock_core.ops.grn import grn_plain
from overlock_core.ops.neighborhood import kernel_av, kernel_av_plain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('export_onnx_tool', os.path.join(ROOT, 'tools', 'export_onnx.py'))
export_onnx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_onnx)

grn = importlib.import_module('overlock_core.ops.grn')  # the package exports the function grn too
fx_features = pytest.importorskip('torchvision.models.feature_extraction')

# timm's fx tests trace at 128 px at most (TARGET_FWD_FX_SIZE): OverLoCK's stride-16 maps are then smaller than K,
# so ContMix's small-map rule runs inside the traced graph
# S and B share T's modules and wiring (only widths and depths differ): T stands for them
FX_VARIANTS = [('test_overlock', 64), ('overlock_xt', 128), pytest.param('overlock_t', 128, marks=pytest.mark.heavy)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _fx_model(model):
    """timm's ``_create_fx_model``: torchvision's feature extractor on the last node, timm's leaf registrations."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = fx_features.get_graph_node_names(model, tracer_kwargs=kwargs)
    return fx_features.create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                                eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


@pytest.mark.parametrize('name,size', FX_VARIANTS)
def test_fx_forward_equals_eager(name, size):
    """timm's test_model_forward_fx: the traced eval model gives exactly the eager outputs."""
    model = timm.create_model(name).eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, size, size)
        out = model(x)
        fx_out = tuple(_fx_model(model)(x).values())
    assert len(fx_out) == 1 and fx_out[0].shape == out.shape == (1, 1000)
    assert torch.equal(fx_out[0], out)
    assert not torch.isnan(out).any()


def test_fx_graph_keeps_the_eager_kernels_as_leaves():
    """The traced graph calls the depth-wise convs, GRNs and ContMix's aggregation as leaves (the exact eager
    kernels), with the small-map rule inside a leaf, not baked in at the traced size."""
    model = timm.create_model('test_overlock').eval()
    gm = _fx_model(model)
    calls = {getattr(n.target, '__name__', str(n.target)) for n in gm.graph.nodes if n.op == 'call_function'}
    assert {'contmix_fit', 'contmix_unfit', 'contmix_av'} <= calls
    leaves = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == 'call_module'}
    assert {'DWConv2d', 'ResDWConv', 'GRN'} <= leaves
    with torch.inference_mode():
        for size in ((64, 64), (224, 160)):  # resized maps and maps that fit K, one graph
            x = torch.randn(2, 3, *size)
            assert torch.equal(tuple(gm(x).values())[0], model(x))


def test_fx_backward_train_mode():
    """timm's test_model_backward_fx: the traced training graph gives every parameter a gradient, and the same
    outputs and gradients as the eager model, accelerated (memory-lean) or not."""
    model = timm.create_model('test_overlock', num_classes=42).train()
    eager = accelerate(copy.deepcopy(model))
    fx = _fx_model(model)
    x = torch.randn(2, 3, 64, 64)
    out = tuple(fx(x).values())[0]
    out.mean().backward()
    ref = eager(x)
    ref.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    assert _rel(out, ref) < 1e-5
    params = dict(fx.named_parameters())
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in model.parameters())
    for n, p in params.items():
        assert p.grad is not None, f'no gradient for {n}'
    for n, p in eager.named_parameters():
        torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-4, atol=1e-6)


def test_switches():
    assert not plain_ops_active() and not plain_forward()
    with plain_ops():
        assert plain_ops_active() and plain_forward()
        with plain_ops(False):
            assert not plain_ops_active()
        assert plain_ops_active()
    assert not plain_ops_active()


@pytest.fixture
def forbid_custom_kernels(monkeypatch):
    """A function that makes every custom kernel, autograd function and operator of the eager model raise."""
    def boom(*args, **kwargs):
        raise AssertionError('a custom kernel ran in the plain form')

    def forbid():
        for fn in (accel._ChannelSplit, grn._GRN, neighborhood._AV):
            monkeypatch.setattr(fn, 'forward', staticmethod(boom))
        for mod, name in ((accel, 'dw_conv2d'), (neighborhood.cpu_ext, 'get'), (accel, 'image_groups'),
                          (dwconv, '_conv'), (neighborhood, '_kernel_av_forward')):
            monkeypatch.setattr(mod, name, boom)
    return forbid


@pytest.mark.parametrize('dense', [None, 'det'])
def test_plain_form_equals_eager(dense, forbid_custom_kernels):
    """The export form (plain operators, inference form) matches the eager model to 1e-5 and calls none of its
    custom kernels, at a size that fits every kernel and at one that takes the small-map rule."""
    model = accelerate(timm.create_model('test_overlock', **({'dense': dense} if dense else {}))).eval()
    deploy = prepare_for_export(model)
    assert accelerated(deploy) is None and accelerated(model) is not None
    assert deploy is not model and all(not b.training for b in deploy.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    inputs = [torch.randn(1, 3, 224, 224), torch.randn(2, 3, 64, 96)]
    with torch.no_grad():
        refs = [model(x) for x in inputs]
        forbid_custom_kernels()
        with plain_ops():
            outs = [(model(x), deploy(x)) for x in inputs]
    for ref, pair in zip(refs, outs):
        for out in pair:
            for o, r in zip(out if dense else [out], ref if dense else [ref]):
                assert o.shape == r.shape
                assert _rel(o, r) <= 1e-5


@pytest.mark.parametrize('h,w,k', [(7, 7, 7), (14, 14, 13), (13, 22, 13), (9, 11, 5), (20, 16, 5)])
def test_kernel_av_plain(h, w, k):
    b, g, d = 2, 3, 4
    q, kw = torch.randn(b, g, h * w, d), torch.randn(b, g, d, k * k)
    rpb, pb, value = torch.randn(g, 2 * k - 1, 2 * k - 1), torch.randn(k * k), torch.randn(b * g, 5, h, w)
    ref = kernel_av(q, kw, rpb, pb, value, k)
    out = kernel_av_plain(q, kw, rpb, pb, value, k)
    assert _rel(out, ref) <= 1e-5
    with plain_ops():  # kernel_av routes to it
        assert torch.equal(kernel_av(q, kw, rpb, pb, value, k), out)
    attn = torch.softmax(torch.matmul(q, kw) + neighborhood.rpb_bias(rpb, h, w) + pb, -1)
    attn = attn.reshape(b * g, h, w, k * k).permute(0, 3, 1, 2)
    assert _rel(out, neighborhood.na2d_av_reference(attn, value, k)) <= 1e-5


@pytest.mark.parametrize('channels_last', [False, True])
def test_grn_plain(channels_last):
    x = torch.randn(2, 8, 9, 7)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    gamma, beta = torch.randn(1, 8, 1, 1), torch.randn(1, 8, 1, 1)
    assert _rel(grn_plain(x, gamma, beta), grn.grn(x, gamma, beta)) <= 1e-6


@pytest.mark.parametrize('h,w', [(14, 14), (8, 10), (7, 7), (25, 40), (5, 3)])
def test_adaptive_avg_pool2d_plain(h, w):
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(adaptive_avg_pool2d_plain(x, (7, 7)), F.adaptive_avg_pool2d(x, 7))


@pytest.mark.parametrize('name', ['test', 'xt', 't', 's', 'b'])
def test_min_input_size(name):
    """The shortest input side whose stride-16 and stride-32 maps fit K3 and K4: ContMix resizes nothing there
    (the exported graph's domain) and resizes one step below."""
    low = min_input_size(name)
    assert low == 193
    k3, k4 = overlock_core.get_arch(name)['kernel_sizes'][2:]
    for side, fits in ((low, True), (low - 1, False)):
        sizes = [side]
        for _ in range(5):  # the stem's and the down-samplings' stride-2 3x3 convs
            sizes.append((sizes[-1] - 1) // 2 + 1)
        s16, s32 = sizes[4], sizes[5]
        resized = contmix_size(s16, s16, k3) != (s16, s16) or contmix_size(s32, s32, k4) != (s32, s32)
        assert resized != fits


def test_min_input_size_of_models():
    assert min_input_size(timm.create_model('test_overlock', features_only=True)) == 193
    # K4 = 9 needs a stride-32 map of 9: 257 -> 129 -> 65 -> 33 -> 17 -> 9
    assert min_input_size(timm.create_model('test_overlock', kernel_sizes=(17, 15, 15, 9))) == 257


# ----------------------------------------------------------------------------------------------------------- ONNX
def _ort_inputs(path):
    ort = pytest.importorskip('onnxruntime')
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return sess.get_inputs()[0].shape, [o.name for o in sess.get_outputs()]


@pytest.mark.parametrize('dense', [None, 'seg'])
def test_export_onnx_tool(tmp_path, capsys, dense):
    """tools/export_onnx.py: random weights, TorchScript exporter; the graph has dynamic batch and image size and
    onnxruntime matches PyTorch at two sizes and batch sizes."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')
    out = tmp_path / 'model.onnx'
    args = ['test_overlock', 'none', str(out), '--exporter', 'torchscript', '--check', '1:224x224,2:256x320']
    rc = export_onnx.main(args + (['--dense', dense] if dense else []))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert 'torchscript exporter, opset 18' in text and 'shorter side >= 193' in text
    errors = [float(line.rsplit(' ', 1)[1]) for line in text.splitlines() if line.startswith('  input ')]
    assert len(errors) == 2 and max(errors) <= 1e-4
    shape, names = _ort_inputs(str(out))
    assert all(not isinstance(d, int) for d in (shape[0], shape[2], shape[3])) and shape[1] == 3
    assert names == (['out0', 'out1', 'out2', 'out3'] if dense else ['logits'])


@pytest.mark.heavy
def test_export_onnx_tool_dynamo(tmp_path, capsys):
    """The same through torch.export's exporter (dynamo=True)."""
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    out = tmp_path / 'model.onnx'
    rc = export_onnx.main(['test_overlock', 'none', str(out), '--exporter', 'dynamo'])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert 'dynamo exporter' in text
    shape, _ = _ort_inputs(str(out))
    assert all(not isinstance(d, int) for d in (shape[0], shape[2], shape[3]))


def test_export_onnx_tool_loads_checkpoints_and_reports_failures(tmp_path, capsys, monkeypatch):
    """A checkpoint is loaded (deploy-form ones too), a file onnxruntime cannot load exits 2, an error above the
    tolerance exits 1, check sizes below the graph's domain are refused."""
    pytest.importorskip('onnxruntime')
    onnx = pytest.importorskip('onnx')
    src = timm.create_model('test_overlock', num_classes=7).eval()
    ckpt = tmp_path / 'w.pth'
    torch.save({'state_dict': src.reparameterize().state_dict()}, ckpt)
    model = export_onnx.build('test_overlock', str(ckpt))
    assert model.num_classes == 7 and all(m.deploy for m in model.modules() if hasattr(m, 'deploy'))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    from_config = export_onnx.build(os.path.join(ROOT, 'configs', 'cls', 'demo.yaml'), 'none')
    assert from_config.num_classes == 4 and from_config.dims == (16, 32, 64, 96)  # test_overlock, 4 classes

    def fake_export(model, path, **kwargs):  # a file that is no ONNX model
        with open(path, 'wb') as f:
            f.write(b'not a model')
        return 'torchscript'
    monkeypatch.setattr(export_onnx, 'export_onnx', fake_export)
    assert export_onnx.main(['test_overlock', 'none', str(tmp_path / 'bad.onnx')]) == 2

    def tiny_export(model, path, **kwargs):  # a valid ONNX file
        torch.onnx.export(torch.nn.Identity(), (torch.randn(1, 3, 4, 4),), path, dynamo=False)
        return 'torchscript'
    monkeypatch.setattr(export_onnx, 'export_onnx', tiny_export)
    monkeypatch.setattr(export_onnx, 'check_onnx', lambda *a: {'1x3x224x224': 2e-4})
    good = tmp_path / 'good.onnx'
    assert export_onnx.main(['test_overlock', '-', str(good)]) == 1
    assert 'differs from PyTorch by 0.0002 > 0.0001' in capsys.readouterr().err
    onnx.checker.check_model(str(good))
    assert export_onnx.main(['test_overlock', '-', str(good), '--tol', '1e-3']) == 0
    with pytest.raises(SystemExit, match='below the minimum input side 193'):
        export_onnx.main(['test_overlock', '-', str(good), '--check', '1:128x128'])
