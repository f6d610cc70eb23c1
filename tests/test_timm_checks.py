"""timm's standard model checks (default cfgs, classifier reset and pooling, feature extraction, intermediates) on
every OverLoCK entrypoint, as timm's own test suite runs them on its models."""
import math

import pytest
import timm
import torch
from timm.data import resolve_data_config

import overlock_core  # noqa: F401  registers the timm models

VARIANTS = ['test_overlock', 'overlock_xt', 'overlock_t', pytest.param('overlock_s', marks=pytest.mark.heavy),
            pytest.param('overlock_b', marks=pytest.mark.heavy)]


@pytest.mark.parametrize('name', VARIANTS)
def test_default_cfg_pooling_and_classifier_reset(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape[1] == model.num_features and tuple(feats.shape[-2:]) == cfg['pool_size']
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')  # no classifier, no pooling: the projected map
        unpooled = model(x)
        assert unpooled.ndim == 4 and tuple(unpooled.shape[-2:]) == cfg['pool_size']
        torch.testing.assert_close(unpooled.mean((2, 3)), pooled, rtol=1e-4, atol=1e-5)
        fresh = timm.create_model(name, num_classes=0, global_pool='').eval()
        out = fresh(x)
        assert out.ndim == 4 and out.shape[1] == fresh.head_hidden_size and tuple(out.shape[-2:]) == cfg['pool_size']
    sd = model.state_dict()
    fresh_sd = timm.create_model(name).state_dict()
    assert cfg['classifier'] + '.weight' in fresh_sd and cfg['first_conv'] + '.weight' in sd


def test_reset_classifier_restores_pooling_and_rejects_unknown_pools():
    model = timm.create_model('test_overlock', num_classes=0, global_pool='').eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(5, 'max')
    with pytest.raises(ValueError, match='global_pool'):
        timm.create_model('test_overlock', global_pool='token')


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_features_only(name, feature_cls):
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    # the wrapper carries the variant's pretrained config, as timm's builder attaches it
    assert model.pretrained_cfg['crop_pct'] == timm.models.get_pretrained_cfg(name.split('.')[0]).crop_pct
    data = resolve_data_config(model=model)
    assert data['crop_pct'] == model.pretrained_cfg['crop_pct'] and data['interpolation'] == 'bicubic'
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert reductions == [4, 8, 16, 32]
    size = (160, 96)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[0] / r) + 1 and o.shape[3] <= math.ceil(size[1] / r) + 1
        assert not torch.isnan(o).any()


def test_features_only_refuses_feature_classes_that_cannot_work():
    for cls in ('hook', 'dict', 'list', 'fx'):
        with pytest.raises(ValueError, match="feature_cls='getter'"):
            timm.create_model('test_overlock', features_only=True, feature_cls=cls)


@pytest.mark.parametrize('name', VARIANTS)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == info.channels()
        assert [(t.shape[2], t.shape[3]) for t in inter] == [(96 // r, 128 // r) for r in info.reduction()]
        only = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        for a, b in zip(only, inter[1:3]):
            torch.testing.assert_close(a, b)
