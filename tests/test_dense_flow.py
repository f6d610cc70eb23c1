"""The data flow of each form against the authors' forward order, re-stated here step by step from their model
files (not through the model's own ``_forward_all``): the classifier passes the raw stage-2 map to stage 3, the
detection/segmentation copies pass ``extra_norm[1]`` of it (their output 1)."""
import pytest
import torch
import torch.nn.functional as F

from overlock_core.accel import AccelConfig, accelerate
from overlock_core.models import OverLoCK

SIZE = (96, 160)  # non-square; stages 3/4 go through ContMix's small-map rule at every variant's K
BIG_SIZE = (128, 96)


def _stage(blocks, x):
    for blk in blocks:
        x = blk(x)
    return x


def authors_classifier_features(m, x):
    """The authors' classification ``forward_features``: the Focus-Net's final map F."""
    x = _stage(m.blocks2, m.patch_embed2(_stage(m.blocks1, m.patch_embed1(x))))
    return _authors_base_features(m, x)[1]


def authors_dense_outputs(m, x):
    """The authors' detection/segmentation ``forward``: ``forward_pre_features`` then ``forward_base_features`` of
    the normalised stage-2 map."""
    x = _stage(m.blocks1, m.patch_embed1(x))
    x0 = m.extra_norm[0](x)
    x = _stage(m.blocks2, m.patch_embed2(x))
    x1 = m.extra_norm[1](x)
    x2, f, overview = _authors_base_features(m, x1)
    x3 = m.extra_norm[3](f)
    if m.h_proj is not None:  # detection only
        x3 = x3 + m.h_proj(m.extra_norm[4](overview))
    return [x0, x1, m.extra_norm[2](x2), x3]


def _authors_base_features(m, x):
    """Base-Net stage 3, Overview-Net, context prior, Focus-Net stages 3 and 4."""
    x = _stage(m.blocks3, m.patch_embed3(x))
    overview = _stage(m.blocks4, m.patch_embed4(x))
    ctx_ori = m.high_level_proj(overview)
    ctx_up = F.interpolate(ctx_ori, size=x.shape[2:], mode='bilinear', align_corners=False)
    ctx = ctx_up
    for blk in m.sub_blocks3:
        x, ctx = blk(x, ctx, ctx_up)
    x2 = torch.cat([x, ctx], dim=1)
    x, ctx = m.patch_embedx(x, ctx)
    for i, blk in enumerate(m.sub_blocks4):
        out = blk(x, ctx, ctx_ori)
        x, ctx = (out, None) if i == len(m.sub_blocks4) - 1 else out
    return x2, x, overview


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_dense(m, x, tol=1e-5):
    with torch.no_grad():
        torch.manual_seed(1)
        ours = m(x)
        torch.manual_seed(1)
        ref = authors_dense_outputs(m, x)
    assert len(ours) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, i
        assert rel_err(a, b) <= tol, f'output {i}: relative error {rel_err(a, b):.2e}'
    return ours


def _randomise(m):
    """Non-trivial values everywhere (zero-initialised rpb/GRN and unit layer scales would hide wiring errors)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith('running_var'):
                b.uniform_(0.5, 1.5, generator=g)
            elif name.endswith('running_mean'):
                b.normal_(0, 0.1, generator=g)
    return m


@pytest.mark.parametrize('dense', ['det', 'seg'])
@pytest.mark.parametrize('arch', ['test', 'xt', 't', pytest.param('s', marks=pytest.mark.heavy),
                                  pytest.param('b', marks=pytest.mark.heavy)])
def test_dense_outputs_follow_the_authors_order(arch, dense):
    torch.manual_seed(0)
    m = _randomise(OverLoCK(arch, dense=dense)).eval()
    x = torch.randn(1, 3, *(BIG_SIZE if arch in ('s', 'b') else SIZE))
    _check_dense(m, x)


@pytest.mark.parametrize('lean', [None, False, True, 'max'])
def test_dense_training_form_follows_the_authors_order(lean):
    """Training mode (batch statistics), the paper form and every lean level; gradients reach stage 2 through
    extra_norm[1]."""
    torch.manual_seed(0)
    m = _randomise(accelerate(OverLoCK('test', dense='det'), None if lean is None else AccelConfig(lean=lean))).train()
    x = torch.randn(2, 3, *SIZE)
    _check_dense(m, x)
    m.zero_grad()
    sum(o.square().mean() for o in m(x)[2:]).backward()  # outputs 2 and 3 only
    assert m.extra_norm[1].weight.grad is not None and m.extra_norm[1].weight.grad.abs().sum() > 0
    assert m.extra_norm[0].weight.grad is None or m.extra_norm[0].weight.grad.abs().sum() == 0


def test_mmdet_backbone_and_features_only_follow_the_dense_order():
    pytest.importorskip('mmengine')
    import timm
    from overlock_core.mm import OverLoCKBackbone
    torch.manual_seed(0)
    bb = _randomise(OverLoCKBackbone('test', dense='seg', drop_path_rate=0.)).eval()
    x = torch.randn(1, 3, *SIZE)
    _check_dense(bb, x)
    f = timm.create_model('test_overlock', features_only=True, dense='seg', norm=True).eval()
    f.model.load_state_dict(bb.state_dict())
    with torch.no_grad():
        for a, b in zip(f(x), authors_dense_outputs(bb, x)):
            assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize('arch', ['test', 't'])
def test_classifier_follows_the_authors_order_and_differs_from_the_dense_one(arch):
    """The classifier feeds the raw stage-2 map on; the same weights in the dense order give other maps, so the two
    forms cannot be swapped without this test noticing."""
    torch.manual_seed(0)
    cls = _randomise(OverLoCK(arch, num_classes=10)).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        f = cls.forward_features(x)
        assert rel_err(f, authors_classifier_features(cls, x)) <= 1e-5
        torch.testing.assert_close(cls(x), cls.forward_head(f))
        dense = OverLoCK(arch, dense='seg').eval()
        dense.load_state_dict({k: v for k, v in cls.state_dict().items() if not k.startswith('head.')}, strict=False)
        _randomise(dense.extra_norm)
        dense_f = dense.forward_intermediates(x, indices=[3], intermediates_only=True)[0]  # un-normalised F
    assert rel_err(dense_f, f) > 1e-2
