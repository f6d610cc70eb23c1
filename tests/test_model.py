"""OverLoCK against the authors' model: counts, shapes, gradients, re-parameterisation, timm citizenship."""
import copy

import pytest
import timm
import torch

import overlock_core  # noqa: F401  registers the timm models
from overlock_core.losses import DeepSupervisionLoss
from overlock_core.models import OverLoCK, dense_channels, get_arch

# parameter counts of the authors' model (training with aux, deploy without aux, det backbone, seg backbone) and
# its state_dict entry counts
COUNTS = {
    'xt': (17_307_272, 16_453_712, 15_657_380, 15_514_328, (1564, 1563, 1557)),
    't': (34_990_472, 33_467_040, 33_127_096, 32_796_472, (2737, 2736, 2730)),
    's': (58_309_772, 56_156_452, 56_446_524, 56_115_900, (3765, 3764, 3758)),
    'b': (98_012_968, 94_942_528, 96_091_496, 95_673_464, (4793, 4792, 4786)),
}
DEPLOY_ENTRIES_WITH_AUX = {'xt': 932, 't': 1585, 's': 2157, 'b': 2729}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('arch', list(COUNTS))
def test_parameter_totals_match_the_authors_model(arch):
    train, deploy, det, seg, entries = COUNTS[arch]
    torch.set_default_device('meta')  # counting needs no storage: builds in milliseconds
    try:
        _check_counts(arch, train, deploy, det, seg, entries)
    finally:
        torch.set_default_device('cpu')


def _check_counts(arch, train, deploy, det, seg, entries):
    m = OverLoCK(arch, aux_head=True)
    assert n_params(m) == train and len(m.state_dict()) == entries[0]
    d = OverLoCK(arch, dense='det')
    assert n_params(d) == det and len(d.state_dict()) == entries[1]
    s = OverLoCK(arch, dense='seg')
    assert n_params(s) == seg and len(s.state_dict()) == entries[2]
    m.reparameterize()
    assert len(m.state_dict()) == DEPLOY_ENTRIES_WITH_AUX[arch]
    m.aux_head = None
    assert n_params(m) == deploy and round(deploy / 1e6) == {'xt': 16, 't': 33, 's': 56, 'b': 95}[arch]


def test_shapes_of_named_tensors():
    sd = OverLoCK('t', aux_head=True).state_dict()
    assert sd['sub_blocks3.1.ls1.weight'].shape == (384, 1, 1, 1)
    assert sd['blocks1.0.proj.7.gamma'].shape == (1, 256, 1, 1)
    assert sd['sub_blocks3.0.rpb1'].shape == (8, 9, 9) and sd['sub_blocks3.0.rpb2'].shape == (8, 25, 25)
    assert sd['sub_blocks4.0.rpb1'].shape == (16, 9, 9) and sd['sub_blocks4.0.rpb2'].shape == (16, 13, 13)
    assert sd['sub_blocks3.0.weight_proj.weight'].shape == (194, 49, 1, 1)
    assert sd['sub_blocks4.0.weight_proj.weight'].shape == (74, 49, 1, 1)
    assert 'sub_blocks3.0.x_scale.weight' not in sd and 'sub_blocks3.1.h_scale.bias' in sd
    assert 'sub_blocks4.0.x_scale.weight' in sd and 'blocks3.0.ls.weight' in sd and 'blocks2.0.ls.weight' not in sd
    for key in ('patch_embed1.10.running_var', 'head.4.bias', 'aux_head.2.weight', 'patch_embedx.h_proj.1.weight',
                'blocks1.0.proj.1.dil_conv_k9_2.weight', 'sub_blocks3.0.lepe.0.dil_bn_k3_5.weight',
                'sub_blocks3.0.weight_key.1.weight', 'sub_blocks4.1.mlp.4.bias', 'high_level_proj.bias'):
        assert key in sd, key


def test_unknown_variant_and_argument():
    with pytest.raises(ValueError, match="unknown OverLoCK variant 'q'"):
        OverLoCK('q')
    with pytest.raises(TypeError, match='unknown OverLoCK argument'):
        OverLoCK('test', kernel_size=3)
    with pytest.raises(ValueError, match='mixer'):
        OverLoCK('test', mixer='attention')


@pytest.mark.parametrize('size', [(33, 33), (112, 137), (64, 64), (97, 65)])
def test_forward_backward_odd_sizes_every_param_gets_grad(size):
    m = timm.create_model('test_overlock', num_classes=7, aux_head=True, drop_path_rate=0.1)
    main, aux = m(torch.randn(2, 3, *size))
    assert main.shape == aux.shape == (2, 7)
    (main.sum() + aux.sum()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.heavy
@pytest.mark.parametrize('arch', ['xt', 't', 's', 'b'])
def test_full_variants_forward_backward_224(arch):
    m = timm.create_model(f'overlock_{arch}', aux_head=True)
    main, aux = m(torch.randn(1, 3, 224, 224))
    assert main.shape == (1, 1000) and aux.shape == (1, 1000)
    (main.sum() + 0.4 * aux.sum()).backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.heavy
def test_t_at_odd_size_511():
    m = OverLoCK('t', num_classes=10).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 511, 511)).shape == (1, 10)


def test_small_map_rule_changes_nothing_at_224_but_runs_below_k():
    m = OverLoCK('test', num_classes=3).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, 64, 64))  # stage-3 map 4x4 < 13 and stage-4 map 2x2 < 7: both resized
    assert torch.isfinite(y).all()


def test_eval_returns_tensor_and_aux_loss():
    m = timm.create_model('test_overlock', num_classes=4, aux_head=True)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    out = m(x)
    loss = DeepSupervisionLoss(torch.nn.CrossEntropyLoss(), 0.4)
    want = torch.nn.functional.cross_entropy(out[0], y) + 0.4 * torch.nn.functional.cross_entropy(out[1], y)
    torch.testing.assert_close(loss(out, y), want)
    m.eval()
    assert isinstance(m(x), torch.Tensor)


def test_reparameterization_equivalence():
    m = OverLoCK('test', num_classes=5)
    for mod in m.modules():  # non-trivial BN statistics so the fold is tested
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    m.eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        ref = m(x)
        dep = timm.utils.reparameterize_model(m)
        out = dep(x)
        authors = copy.deepcopy(m).reparameterize()  # the checkpoint form: branches merged, BatchNorms kept
        torch.testing.assert_close(authors(x), ref, rtol=1e-4, atol=1e-4)
    assert not any('dil_conv' in k for k in dep.state_dict())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # the inference form folds every BatchNorm into a conv beside it (before it, or a 1x1 conv after it), the
    # head's included; the checkpoint form keeps them all for deploy=True models
    bns = [n for n, mod in dep.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns == []
    kept = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in authors.modules())
    assert kept == 1 + 4 + 3 + 2 + 7 * 3 + 4  # head, stem, downsamplings, patch_embedx, Focus blocks, Base blocks


def test_se_scale_is_its_modules_output():
    """The accelerated SE's ``scale`` runs the 1x1 convs of ``proj`` as matmuls on the pooled vectors: the same
    numbers, gradients included, on channels-last maps too."""
    from overlock_core.accel import FastSE, accelerate
    from overlock_core.models.layers import SEModule
    se = accelerate(SEModule(24).double())
    assert type(se) is FastSE
    x = torch.randn(3, 24, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(se.scale(a), se.proj(b))
    g = torch.randn(3, 24, 1, 1, dtype=torch.float64)
    grads = [torch.autograd.grad(out, [inp, *se.parameters()], g) for out, inp in ((se.scale(a), a), (se.proj(b), b))]
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v)


def test_grad_checkpointing_equivalence():
    m = OverLoCK('test', num_classes=5, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    m2 = copy.deepcopy(m)
    m2.set_grad_checkpointing(True)
    m.train(), m2.train()
    y1, y2 = m(x), m2(x)
    torch.testing.assert_close(y1, y2)
    y1.square().mean().backward()
    y2.square().mean().backward()
    for (n, p1), p2 in zip(m.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)



@pytest.mark.parametrize('accel', [False, True])
def test_whole_model_compiles_as_one_graph_with_eager_gradients(accel):
    """torch.compile(model), paper form and accelerated: one graph for the whole training-form model (no graph
    break, so no recompiles with symbolic shapes) on maps where the eager CPU paths (frequency-space and widened
    depth-wise kernels) would be taken, and the traced forward and backward (our custom operators included) give
    eager's outputs and gradients. ``aot_eager`` traces exactly what inductor gets, without its C++ build."""
    import torch._dynamo as dynamo

    from overlock_core.accel import accelerate
    dynamo.reset()
    m = OverLoCK('test', num_classes=5, drop_path_rate=0.0).train()
    m = accelerate(m) if accel else m
    x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)  # stage 1 at 24x24: over 16x16
    assert dynamo.explain(m)(x).graph_break_count == 0
    mc = torch.compile(copy.deepcopy(m), backend='aot_eager', fullgraph=True)
    y, yc = m(x), mc(x)
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
    y.square().mean().backward()
    yc.square().mean().backward()
    scale = max(p.grad.abs().max() for p in m.parameters())  # BN-cancelled biases have ~0 gradients: absolute
    for (n, p), pc in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-5 * scale.item(), msg=n)
    deploy = timm.utils.reparameterize_model(m.eval())
    with torch.no_grad():
        assert dynamo.explain(deploy)(x).graph_break_count == 0

def test_features_only_and_intermediates():
    m = timm.create_model('test_overlock', features_only=True, out_indices=(1, 3))
    feats = m(torch.randn(1, 3, 96, 128))
    chans = dense_channels('test')
    assert [f.shape for f in feats] == [(1, chans[1], 12, 16), (1, chans[3], 3, 4)]
    assert m.feature_info.channels() == [chans[1], chans[3]] and m.feature_info.reduction() == [8, 32]
    full = OverLoCK('test', num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x)
        torch.testing.assert_close(final, full.forward_features(x))
        torch.testing.assert_close(inter[-1], final)
        assert len(full.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)) == 2


@pytest.mark.parametrize('dense', ['det', 'seg'])
def test_dense_outputs(dense):
    m = OverLoCK('t', dense=dense).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 128, 160))
    assert [o.shape[1] for o in outs] == [64, 128, 384, 640]
    assert [o.shape[-2:] for o in outs] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    assert (m.h_proj is not None) == (dense == 'det') and len(m.extra_norm) == (5 if dense == 'det' else 4)


def test_cpu_stem_runs_channels_last_and_hands_on_the_input_layout():
    """The accelerated CPU stem runs channels-last (a kernel choice): the stage-1 input keeps the caller's layout
    and equals the paper-form stem run in NCHW up to rounding, in the forward and the backward."""
    from overlock_core.accel import ChannelsLastStem, accelerate
    m = OverLoCK('test', num_classes=3).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    plain = m.patch_embed1(x)
    accelerate(m)
    assert type(m.patch_embed1) is ChannelsLastStem
    fast = m.patch_embed1(x)
    assert fast.is_contiguous() and not fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad(fast, x, g)[0], torch.autograd.grad(plain, x, g)[0],
                               rtol=1e-4, atol=1e-4)
    cl = m.patch_embed1(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_det_adds_overview_projection_to_last_map():
    m = OverLoCK('test', dense='det').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base = m(x)[3]
        m.h_proj[1].weight.fill_(1.0)
        changed = m(x)[3]
        m.h_proj[1].weight.zero_()
        m.h_proj[1].bias.zero_()
        no_proj = m(x)[3]
    assert not torch.allclose(base, changed)
    maps, _, _ = m._forward_all(x)
    torch.testing.assert_close(no_proj, m.extra_norm[3](maps[3]))


def test_timm_citizenship():
    m = timm.create_model('test_overlock', num_classes=10, drop_path_rate=0.15)
    for name, crop in (('overlock_xt', 0.925), ('overlock_t', 0.95), ('overlock_s', 0.95), ('overlock_b', 0.975)):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.crop_pct == crop and cfg.interpolation == 'bicubic'
    assert timm.data.resolve_data_config({}, model=m)['interpolation'] == 'bicubic'
    assert set(timm.list_models('overlock*')) >= {'overlock_xt', 'overlock_t', 'overlock_s', 'overlock_b'}
    m.reset_classifier(3)
    assert m.get_classifier().out_channels == 3
    groups = timm.models.group_parameters(m, m.group_matcher())
    first = [n for n in groups[min(groups)]]
    assert all(n.startswith('patch_embed1.') for n in first)
    order = sorted(groups)
    idx = {k: i for i, k in enumerate(order)}
    lid = {n: idx[k] for k, names in groups.items() for n in names}
    assert lid['blocks1.0.dwconv.weight'] < lid['blocks4.0.dwconv.weight'] < lid['sub_blocks3.0.dwconv1.weight'] \
        < lid['sub_blocks4.0.dwconv1.weight'] < lid['head.4.weight']
    pre = m.forward_head(m.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True)
    assert pre.shape == (1, m.head_hidden_size)


def test_ablation_switches():
    x = torch.randn(1, 3, 64, 64)
    for kw in (dict(mixer='static'), dict(use_context=False), dict(kernel_sizes=(7, 7, 7, 7), smk_size=3),
               dict(sub_num_heads=(2, 3))):
        m = timm.create_model('test_overlock', num_classes=2, **kw)
        m(x).sum().backward()
    assert get_arch('t', smk_size=3)['smk_size'] == 3


def test_model_files_have_no_device_or_layout_branches_and_no_autograd_functions():
    """The paper-form model files test no device or memory layout and define no autograd function: those live in
    ``ops`` (the operators' kernel choice) and ``accel`` (the accelerated forms)."""
    import inspect
    import re

    from overlock_core.models import layers, overlock
    banned = re.compile(r'\.is_cuda|device\.type|memory_format|channels_last|autograd\.Function'
                        r'|is_autocast_enabled|plain_forward|plain_ops')
    for mod in (layers, overlock):
        hits = [ln.strip() for ln in inspect.getsource(mod).splitlines()
                if banned.search(ln.split('#')[0]) and not ln.strip().startswith(('"', "'"))]
        assert not hits, (mod.__name__, hits)
