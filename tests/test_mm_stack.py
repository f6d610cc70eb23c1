"""The OpenMMLab stack and OverLoCK's mm adapter: compiled mmcv ops, registries, cross-package configs, every det/seg
config, the backbone interface, weight loading, the optimizer param groups and the safe-load allow-list.

Fast (CPU, tiny ``test`` variant, 32-97 px inputs); the end-to-end training runs are in test_detection.py /
test_segmentation.py.
"""
import glob
import os
import os.path as osp
import pickle
import re

import pytest
import torch
import torch.nn as nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'det', '*.py')))
SEG_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'seg', '*.py')))


# ----------------------------------------------------------------------------------------------------- the stack
def test_mmcv_compiled_ops_run_on_cpu():
    """mmcv._ext loads; nms and RoIAlign (forward and backward) agree with torchvision's reference ops."""
    import torchvision
    from mmcv.ops import RoIAlign, nms, roi_align
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2] and dets.shape == (2, 5)
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(200, 4, generator=g) * 50
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(200, generator=g)
    assert torch.equal(nms(boxes, scores, 0.5)[1].sort()[0], torchvision.ops.nms(boxes, scores, 0.5).sort()[0])

    x = torch.randn(2, 8, 32, 40, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 3.2, 4.1, 20.5, 17.3], [1, 0., 0., 39., 31.], [0, 10., 5., 12., 30.]])
    a = roi_align(x, rois, (7, 7), 0.5, 2, 'avg', True)
    b = torchvision.ops.roi_align(x, rois, (7, 7), 0.5, 2, aligned=True)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a.sum(), x)
    gb, = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(ga, gb)
    assert RoIAlign((2, 2), 1.0, 2, aligned=True)(x, rois).shape == (3, 8, 2, 2)


def test_mmdet_mmseg_import_and_share_the_root_registry():
    import mmdet
    import mmseg
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import MODELS, DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS

    import overlock_core.mm  # noqa: F401
    assert mmdet.__version__ == '3.3.0' and mmseg.__version__ == '1.2.2'
    assert DET_MODELS.parent is MODELS and SEG_MODELS.parent is MODELS
    cfg = dict(type='OverLoCKBackbone', arch='test', dense='det')
    for scope, registry in (('mmdet', DET_MODELS), ('mmseg', SEG_MODELS)):
        with DefaultScope.overwrite_default_scope(scope):
            m = registry.build(cfg)
        assert type(m).__name__ == 'OverLoCKBackbone'
    # mmdet and mmseg modules are found from their scopes
    with DefaultScope.overwrite_default_scope('mmdet'):
        assert DET_MODELS.get('FPN') is not None
    with DefaultScope.overwrite_default_scope('mmseg'):
        assert SEG_MODELS.get('UPerHead') is not None


def test_cross_package_base_configs_resolve(tmp_path):
    from mmengine.config import Config
    for base, scope in (('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 'mmdet'),
                        ('mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py', 'mmseg')):
        p = tmp_path / f'{scope}_child.py'
        p.write_text(f"_base_ = ['{base}']\nmodel = dict(backbone=dict(depth=18))\n")
        cfg = Config.fromfile(str(p))
        assert cfg.default_scope == scope
        assert cfg.model.backbone.depth == 18


# ----------------------------------------------------------------------------------------------------- configs
def _load(path):
    from mmengine.config import Config
    return Config.fromfile(path)


def _channels(arch):
    from overlock_core.models import dense_channels
    return list(dense_channels(arch))


def test_config_set_is_complete():
    names = {osp.basename(p) for p in DET_CONFIGS + SEG_CONFIGS}
    for v in 'tsb':
        for s in ('1x', '3x'):
            assert f'overlock_{v}_maskrcnn_{s}.py' in names
        assert f'overlock_{v}_cascade_maskrcnn_3x.py' in names
        assert f'overlock_{v}_upernet_160k_ade20k.py' in names
    assert {'overlock_s_maskrcnn.py', 'demo_maskrcnn.py', 'demo_upernet.py'} <= names


EXPECTED = {  # variant -> (drop path det, drop path seg)
    't': (0.2, 0.2), 's': (0.4, 0.3), 'b': (0.6, 0.5)}


@pytest.mark.parametrize('path', DET_CONFIGS, ids=osp.basename)
def test_det_config(path):
    cfg = _load(path)
    name = osp.basename(path)
    assert cfg.default_scope == 'mmdet'
    assert 'overlock_core.mm' in cfg.custom_imports['imports']
    bb = cfg.model.backbone
    assert bb.type == 'OverLoCKBackbone' and bb.dense == 'det'
    assert list(cfg.model.neck.in_channels) == [_channels(bb.arch)[i] for i in bb.out_indices]
    assert cfg.optim_wrapper.constructor == 'OverLoCKOptimWrapperConstructor'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    if name.startswith('demo'):
        assert bb.arch == 'test' and cfg.get('sync_bn') is None
        return
    assert cfg.sync_bn == 'torch'
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert bb.drop_path_rate == EXPECTED[bb.arch][0]
    assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
    sched = cfg.param_scheduler
    assert sched[0].type == 'LinearLR'
    assert any(t.type == 'Resize' and tuple(t.scale) == (1333, 800) for t in cfg.test_dataloader.dataset.pipeline)
    if 'cascade' in name:
        assert cfg.model.type == 'CascadeRCNN' and cfg.train_cfg.max_epochs == 36
        for head in cfg.model.roi_head.bbox_head:
            assert head.type == 'ConvFCBBoxHead' and head.num_shared_convs == 4 and head.num_shared_fcs == 1
            assert head.loss_bbox.type == 'GIoULoss' and head.reg_decoded_bbox
            assert head.norm_cfg.type == 'SyncBN'
    elif '3x' in name:
        assert cfg.model.type == 'MaskRCNN'
        assert cfg.optim_wrapper.optimizer.lr == 1e-4 and cfg.train_cfg.max_epochs == 36
        assert sched[0].end == 500 and sched[0].start_factor == 0.001 and list(sched[1].milestones) == [27, 33]
        assert any(t.type == 'RandomChoice' for t in cfg.train_dataloader.dataset.pipeline)
    else:
        assert cfg.model.type == 'MaskRCNN'
        assert cfg.optim_wrapper.optimizer.lr == 2e-4 and cfg.train_cfg.max_epochs == 12
        assert sched[0].end == 500 and sched[0].start_factor == 0.001 and list(sched[1].milestones) == [8, 11]


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=osp.basename)
def test_seg_config(path):
    cfg = _load(path)
    assert cfg.default_scope == 'mmseg'
    assert {'overlock_core.mm', 'segmentation'} <= set(cfg.custom_imports['imports'])
    bb = cfg.model.backbone
    assert bb.type == 'OverLoCKBackbone' and bb.dense == 'seg' and cfg.model.get('pretrained') is None
    chans = [_channels(bb.arch)[i] for i in bb.out_indices]
    assert list(cfg.model.decode_head.in_channels) == chans
    aux = cfg.model.auxiliary_head
    assert aux.in_index == 2 and aux.in_channels == chans[2] and aux.loss_decode.loss_weight == 0.4
    assert any(t.type == 'AlignResize' for t in cfg.test_dataloader.dataset.pipeline)
    tta = cfg.tta_pipeline[1]['transforms'][0]
    assert [t.type for t in tta] == ['AlignResize'] * 6
    if osp.basename(path).startswith('demo'):
        return
    assert cfg.sync_bn == 'torch' and bb.drop_path_rate == EXPECTED[bb.arch][1]
    assert cfg.optim_wrapper.optimizer.lr == 6e-5 and cfg.optim_wrapper.optimizer.weight_decay == 0.01
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2
    assert cfg.param_scheduler[0].end == 1500 and cfg.param_scheduler[1].type == 'PolyLR'
    assert cfg.model.decode_head.num_classes == 150 and tuple(cfg.crop_size) == (512, 512)
    assert [tuple(t.scale) for t in tta] == [(int(2048 * r), int(512 * r)) for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]


def _tiny_model_cfg(cfg):
    """The config's model with the backbone swapped to the test variant (same wiring, CPU-sized)."""
    m = cfg.model.copy()
    chans = _channels('test')
    m.backbone = dict(m.backbone, arch='test', init_cfg=None, drop_path_rate=0.0)
    if 'neck' in m:
        m.neck = dict(m.neck, in_channels=chans)
    if 'decode_head' in m:
        m.decode_head = dict(m.decode_head, in_channels=chans, channels=32)
        m.auxiliary_head = dict(m.auxiliary_head, in_channels=chans[2], channels=16)
    return m


@pytest.mark.parametrize('path', DET_CONFIGS + SEG_CONFIGS, ids=osp.basename)
def test_config_builds_and_runs(path):
    """Build the whole detector / segmentor of every config (backbone swapped to the test variant, init_cfg=None);
    run a predict pass for the T and demo recipes (S/B differ from T only in the backbone variant)."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope, MODELS
    cfg = _load(path)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = revert_sync_batchnorm(MODELS.build(_tiny_model_cfg(cfg)))
        model.init_weights()
        model.eval()
        if not re.search(r'_t_|demo', osp.basename(path)):
            return
        if cfg.default_scope == 'mmdet':
            from mmdet.testing import demo_mm_inputs
            data = model.data_preprocessor(demo_mm_inputs(1, [[3, 64, 96]], num_classes=3, with_mask=True), False)
            with torch.no_grad():
                feats = model.extract_feat(data['inputs'])
                assert len(feats) == 5 and feats[0].shape[-2:] == (16, 24)
                res = model.predict(data['inputs'], data['data_samples'])
            assert 'masks' in res[0].pred_instances
        else:
            with torch.no_grad():
                out = model(torch.randn(1, 3, 64, 96), mode='tensor')
            assert out.shape == (1, cfg.model.decode_head.num_classes, 16, 24)


def test_real_variant_channels_match_configs():
    """One real-size backbone (T, det form) really outputs the channels every config's neck/head is wired to."""
    from mmengine.registry import MODELS
    import overlock_core.mm  # noqa: F401
    m = MODELS.build(dict(type='OverLoCKBackbone', arch='t', dense='det')).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == _channels('t') == [64, 128, 384, 640]
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]
    assert _channels('s') == [64, 128, 448, 640] and _channels('b') == [80, 160, 528, 720]


# ----------------------------------------------------------------------------------------------------- backbone
@pytest.fixture(scope='module')
def build():
    from mmengine.registry import MODELS
    import overlock_core.mm  # noqa: F401

    def _build(**kw):
        return MODELS.build(dict(dict(type='OverLoCKBackbone', arch='test', dense='det'), **kw))
    return _build


@pytest.mark.parametrize('size', [(64, 64), (65, 97), (33, 47)])
@pytest.mark.parametrize('dense', ['det', 'seg'])
def test_backbone_shapes_odd_sizes(build, size, dense):
    m = build(dense=dense).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, *size))
    assert isinstance(outs, tuple) and len(outs) == 4
    assert [o.shape[1] for o in outs] == list(m.out_channels) == _channels('test')
    h, w = size
    for o, s in zip(outs, (4, 8, 16, 32)):
        assert abs(o.shape[-2] - h / s) < 1.01 and abs(o.shape[-1] - w / s) < 1.01
    assert (m.h_proj is not None) == (dense == 'det')


def test_backbone_out_indices_and_bad_args(build):
    m = build(out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [_channels('test')[1], _channels('test')[3]] == list(m.out_channels)
    with pytest.raises(ValueError):
        build(dense='cls')
    with pytest.raises(ValueError):
        build(frozen_stages=7)
    with pytest.raises(TypeError):
        build(pretrained=123)
    with pytest.raises(ValueError, match='unknown OverLoCK variant'):
        build(arch='q')


def test_backbone_frozen_stages_and_norm_eval(build):
    m = build(frozen_stages=2, norm_eval=True)
    m.train()
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(('patch_embed1.', 'blocks1.', 'patch_embed2.', 'blocks2.', 'extra_norm.0.',
                                        'extra_norm.1.')) for n in frozen)
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith(('blocks3.', 'sub_blocks')))
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)  # norm_eval
    m2 = build(frozen_stages=1)
    m2.train()
    assert not m2.patch_embed1[1].training and not m2.blocks1[0].training and m2.blocks2[0].training


def test_backbone_with_cp_same_output_and_grads(build):
    torch.manual_seed(0)
    a = build(drop_path_rate=0.0).train()
    b = build(drop_path_rate=0.0, with_cp=True).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    ya, yb = a(x), b(x)
    for u, v in zip(ya, yb):
        torch.testing.assert_close(u, v)
    sum(y.mean() for y in yb).backward()
    assert all(p.grad is not None for p in b.parameters() if p.requires_grad)


def test_backbone_no_unused_parameters(build):
    """Every parameter gets a gradient from the dense forward (DDP needs no find_unused_parameters)."""
    for dense in ('det', 'seg'):
        m = build(dense=dense).train()
        sum(o.float().mean() for o in m(torch.randn(2, 3, 64, 64))).backward()
        unused = [n for n, p in m.named_parameters() if p.grad is None]
        assert not unused, unused


def test_backbone_pretrained_loading(build, tmp_path):
    import timm
    from overlock_core.checkpoint import CheckpointError

    cls = timm.create_model('test_overlock', num_classes=10, aux_head=True)
    sd = cls.state_dict()
    p = tmp_path / 'in1k.pth'
    torch.save({'state_dict': sd}, p)
    m = build(init_cfg=dict(type='Pretrained', checkpoint=str(p)))
    m.init_weights()
    own = m.state_dict()
    shared = [k for k in sd if k in own]
    assert len(shared) > 100 and not any(k.startswith(('head.', 'aux_head.')) for k in own)
    for k in shared:
        torch.testing.assert_close(own[k], sd[k])

    # a detector checkpoint (backbone. prefix + other parts) loads, with and without an explicit prefix
    det = {f'backbone.{k}': v + 1 for k, v in m.state_dict().items()}
    det['neck.lateral_convs.0.conv.weight'] = torch.zeros(4, 4, 1, 1)
    torch.save({'meta': {}, 'state_dict': det}, tmp_path / 'det.pth')
    for prefix in (None, 'backbone.'):
        m2 = build(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'det.pth'), prefix=prefix))
        m2.init_weights()
        torch.testing.assert_close(m2.state_dict()['blocks1.0.dwconv.weight'], sd['blocks1.0.dwconv.weight'] + 1)

    # any other missing backbone key is an error that names it
    broken = {k: v for k, v in sd.items() if not k.startswith('sub_blocks3.0.rpb1')}
    torch.save(broken, tmp_path / 'broken.pth')
    m3 = build(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'broken.pth')))
    with pytest.raises(CheckpointError, match='sub_blocks3.0.rpb1'):
        m3.init_weights()
    # another variant: mis-shaped keys are named
    torch.save(timm.create_model('overlock_xt', num_classes=0).state_dict(), tmp_path / 'xt.pth')
    m4 = build(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'xt.pth')))
    with pytest.raises(CheckpointError, match='mis-shaped'):
        m4.init_weights()


# ----------------------------------------------------------------------------------------------------- optimizer
class _Det(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(8, 8, 1)
        self.head_bn = nn.BatchNorm2d(8)


def _groups(model, official):
    from overlock_core.mm.optim import OverLoCKOptimWrapperConstructor
    ctor = OverLoCKOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05)), dict(official=official))
    opt = ctor(model).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = set(), set()
    for g in opt.param_groups:
        for p in g['params']:
            (no_decay if g['weight_decay'] == 0 else decay).add(names[id(p)])
        assert g['lr'] == 1e-3
    assert len(decay) + len(no_decay) == len(names)  # every parameter exactly once
    return opt, decay, no_decay


def test_param_groups_policy(build):
    model = _Det(build())
    opt, decay, no_decay = _groups(model, official=False)
    assert len(opt.param_groups) == 2
    patterns = {
        'rpb': r'\.rpb[12]$', 'layer scale': r'\.(ls|ls1|ls2|x_scale|h_scale)\.weight$', 'h_proj.1': r'h_proj\.1\.',
        'GRN': r'\.(gamma|beta)$', 'bias': r'\.bias$', 'BN': r'patch_embed1\.1\.weight$', 'LN': r'norm[12]\.weight$',
        'RepConv LN': r'blocks1\.0\.proj\.0\.weight$', 'extra_norm': r'extra_norm\.', 'head BN': r'head_bn\.weight'}
    for what, pat in patterns.items():
        hits = [n for n in decay | no_decay if re.search(pat, n)]
        assert hits, what
        assert all(n in no_decay for n in hits), (what, [n for n in hits if n in decay])
    # conv / linear kernels are decayed, including the neck's
    assert 'neck.weight' in decay and 'backbone.blocks1.0.dwconv.weight' in decay
    assert all(n.endswith('.weight') for n in decay)


def test_param_groups_official_switch(build):
    model = _Det(build())
    opt, decay, no_decay = _groups(model, official=True)
    assert len(opt.param_groups) == len(list(model.parameters()))  # mmcv style: one group per parameter
    # the authors' rule: only names containing 'norm' (norm1/norm2/extra_norm LayerNorms) are exempt
    assert no_decay == {n for n, _ in model.named_parameters() if 'norm' in n}
    assert all(re.search(r'(norm[12]|extra_norm)', n) for n in no_decay)
    for n in ('backbone.sub_blocks3.0.rpb1', 'backbone.blocks3.0.ls.weight', 'backbone.blocks1.0.proj.7.gamma',
              'backbone.patch_embed1.1.weight', 'backbone.blocks1.0.proj.0.weight', 'neck.bias'):
        assert n in decay, n


# ----------------------------------------------------------------------------------------------------- safe load
class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def test_safe_load_allows_mmengine_checkpoints_and_refuses_code(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner.checkpoint import _load_checkpoint

    from overlock_core.mm.safe_load import MMENGINE_SAFE_GLOBALS, mmengine_checkpoint_globals
    names = {g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__name__}' for g in MMENGINE_SAFE_GLOBALS}
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in names
    assert not any(n.startswith(('os.', 'posix.', 'subprocess', 'mmengine.config')) for n in names)
    # 'builtins.getattr' is served by a stand-in that only resolves HistoryBuffer's statistics methods
    assert getattr not in [g[0] if isinstance(g, tuple) else g for g in MMENGINE_SAFE_GLOBALS]

    hub = MessageHub.get_instance('safe_load_test')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/lr', np.float64(0.01))
    hub.update_info('iter', 3)
    ckpt = {'meta': {'epoch': 1, 'iter': 3, 'seed': 0, 'np_scalar': np.float64(2.0), 'dtype': np.dtype('float64'),
                     'count': np.int64(7)},
            'message_hub': hub.state_dict(), 'state_dict': {'w': torch.ones(2)}}
    torch.save(ckpt, tmp_path / 'ok.pth')
    with mmengine_checkpoint_globals():
        loaded = _load_checkpoint(str(tmp_path / 'ok.pth'), map_location='cpu')  # mmengine's own torch.load call
    assert isinstance(loaded['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    assert loaded['meta']['np_scalar'] == 2.0

    marker = tmp_path / 'pwned'
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Evil(marker)}, f)
    torch.save({'x': _Evil(marker)}, tmp_path / 'evil_zip.pth')

    class _Sneaky:  # getattr beyond HistoryBuffer's statistics methods
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))
    torch.save({'x': _Sneaky()}, tmp_path / 'getattr.pth')
    with mmengine_checkpoint_globals():
        for name in ('evil.pth', 'evil_zip.pth', 'getattr.pth'):
            with pytest.raises(pickle.UnpicklingError):
                _load_checkpoint(str(tmp_path / name), map_location='cpu')
    assert not marker.exists()
    # outside the block the allow-list is gone again (unless a launcher installed it for the whole process)
    if not any(g in torch.serialization.get_safe_globals() for g in MMENGINE_SAFE_GLOBALS):
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(str(tmp_path / 'ok.pth'), map_location='cpu')


def _run_python(code):
    import subprocess
    import sys
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_importing_the_adapter_changes_no_other_library():
    """Importing overlock_core.mm (directly or through a config's custom_imports) only registers modules: torch's
    weights_only allow-list and mmengine's checkpoint saving stay as they were until install_runner_patches()."""
    code = """
import torch
import mmengine.runner.checkpoint as ck
import mmengine.runner.runner as rr
allowed = lambda: set(torch.serialization.get_safe_globals())
before = (allowed(), ck.save_checkpoint, rr.save_checkpoint)
from mmengine.config import Config
cfg = Config.fromfile('configs/seg/demo_upernet.py')  # custom_imports: overlock_core.mm, segmentation
import overlock_core.mm as om
from overlock_core.mm import atomic, safe_load
from mmengine.registry import MODELS
assert 'overlock_core.mm' in cfg.custom_imports['imports'] and MODELS.get('OverLoCKBackbone') is om.OverLoCKBackbone
assert (ck.save_checkpoint, rr.save_checkpoint) == before[1:], 'import patched mmengine'
# torch allow-lists its own classes as its submodules load (torch.distributed.tensor, ...); nothing else may appear
origin = lambda g: getattr(g[0] if isinstance(g, tuple) else g, '__module__', None) or ''
added = allowed() - before[0]
assert all(origin(g).startswith('torch.') for g in added), sorted(map(str, added))
assert not any(g in allowed() for g in om.MMENGINE_SAFE_GLOBALS), 'import allow-listed mmengine classes'
assert not om.runner_patches_installed()
after_import = allowed()
with om.mmengine_checkpoint_globals():
    assert all(g in allowed() for g in om.MMENGINE_SAFE_GLOBALS)
assert allowed() == after_import, 'scoped'
om.install_runner_patches()
om.install_runner_patches()  # idempotent
assert allowed() == after_import | set(om.MMENGINE_SAFE_GLOBALS)
assert ck.save_checkpoint is rr.save_checkpoint is atomic.atomic_save_checkpoint
assert om.runner_patches_installed()
with om.mmengine_checkpoint_globals():  # a scoped block leaves the installed list in place
    pass
assert om.runner_patches_installed()
print('ok')
"""
    p = _run_python(code)
    assert p.returncode == 0 and p.stdout.strip().endswith('ok'), p.stdout[-2000:] + p.stderr[-3000:]


def test_overlock_core_does_not_import_the_adapter():
    """The core package (models, ops, checkpoint loading) imports neither overlock_core.mm nor mmengine."""
    code = """
import sys
import overlock_core, overlock_core.checkpoint, overlock_core.models, overlock_core.ops
import timm
m = timm.create_model('test_overlock', num_classes=3)
bad = sorted(n for n in sys.modules if n.startswith(('overlock_core.mm', 'mmengine', 'mmcv', 'mmdet', 'mmseg')))
assert not bad, bad
print('ok')
"""
    p = _run_python(code)
    assert p.returncode == 0 and p.stdout.strip().endswith('ok'), p.stdout[-2000:] + p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------- launchers
def _tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'_overlock_tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_tool_flags(tmp_path):
    train = _tool('train')
    cfg_path = osp.join(ROOT, 'configs', 'det', 'overlock_s_maskrcnn.py')
    cfg = train.build_cfg(train.parse_args([cfg_path, '--amp', '--auto-scale-lr', '--resume',
                                            '--cfg-options', 'model.backbone.with_cp=True']))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable and cfg.resume and cfg.load_from is None
    assert cfg.model.backbone.with_cp and cfg.model.backbone.arch == 's'
    assert cfg.work_dir.endswith(osp.join('work_dirs', 'overlock_s_maskrcnn'))
    ck = tmp_path / 'epoch_1.pth'
    ck.write_bytes(b'')
    cfg = train.build_cfg(train.parse_args([osp.join(ROOT, 'configs', 'seg', 'demo_upernet.py'), '--resume', str(ck),
                                            '--work-dir', str(tmp_path / 'w'),
                                            '--cfg-options', 'data_root=/data/elsewhere']))
    assert cfg.resume and cfg.load_from == str(ck) and cfg.work_dir == str(tmp_path / 'w')
    assert cfg.train_dataloader.dataset.data_root == '/data/elsewhere'
    assert cfg.test_dataloader.dataset.data_root == '/data/elsewhere'
    with pytest.raises(SystemExit):
        train.build_cfg(train.parse_args([cfg_path, '--resume', str(tmp_path / 'missing.pth')]))


def test_test_tool_tta_and_data_root(tmp_path):
    test = _tool('test')
    ck = tmp_path / 'iter_1.pth'
    ck.write_bytes(b'')
    cfg = test.build_cfg(test.parse_args([osp.join(ROOT, 'configs', 'seg', 'overlock_b_upernet_160k_ade20k.py'),
                                          str(ck), '--tta', '--work-dir', str(tmp_path)]))
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module.backbone.arch == 'b'
    assert cfg.test_dataloader.dataset.pipeline[1].type == 'TestTimeAug'
    assert cfg.load_from == str(ck)
    cfg = test.build_cfg(test.parse_args([osp.join(ROOT, 'configs', 'det', 'demo_maskrcnn.py'), str(ck),
                                          '--cfg-options', 'data_root=/x/coco/']))
    assert cfg.test_evaluator.ann_file == '/x/coco/annotations/instances_val.json'
    with pytest.raises(SystemExit):  # no mask TTA in mmdet
        test.build_cfg(test.parse_args([osp.join(ROOT, 'configs', 'det', 'demo_maskrcnn.py'), str(ck), '--tta']))


@pytest.fixture
def runner_patches(monkeypatch):
    """``install_runner_patches()`` for one test; mmengine's functions and torch's allow-list restored after it."""
    import mmengine.runner.checkpoint as mm_checkpoint
    import mmengine.runner.runner as mm_runner

    from overlock_core.mm import install_runner_patches
    monkeypatch.setattr(mm_checkpoint, 'save_checkpoint', mm_checkpoint.save_checkpoint)  # restored at teardown
    monkeypatch.setattr(mm_runner, 'save_checkpoint', mm_runner.save_checkpoint)
    allowed = torch.serialization.get_safe_globals()
    install_runner_patches()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)


def test_runner_checkpoints_are_written_atomically(tmp_path, runner_patches):
    import mmengine.runner.runner as mm_runner
    import torch
    from overlock_core.mm.atomic import atomic_save_checkpoint
    assert mm_runner.save_checkpoint is atomic_save_checkpoint
    path = tmp_path / 'epoch_1.pth'
    mm_runner.save_checkpoint({'state_dict': {'w': torch.ones(3)}, 'meta': {'epoch': 1}}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_1.pth']
    assert torch.load(path, weights_only=True)['meta']['epoch'] == 1


def test_nonfinite_loss_stops_before_saving(tmp_path):
    import pytest
    import torch
    from types import SimpleNamespace
    from overlock_core.mm import NonFiniteLossHook
    (tmp_path / 'epoch_2.pth').write_bytes(b'x')
    runner = SimpleNamespace(work_dir=str(tmp_path), iter=41, epoch=2)
    hook = NonFiniteLossHook()
    hook.after_train_iter(runner, 0, outputs={'loss': torch.tensor(1.5)})
    with pytest.raises(RuntimeError, match=r'non-finite loss \(nan\) at iteration 42.*epoch_2\.pth'):
        hook.after_train_iter(runner, 0, outputs={'loss': torch.tensor(float('nan'))})


def test_unknown_cfg_option_is_refused_before_work():
    from mmengine.config import Config
    from overlock_core.mm.runner_utils import merge_cfg_options
    import mmdet  # noqa: F401
    cfg_path = osp.join(ROOT, 'configs', 'det', 'demo_maskrcnn.py')
    with pytest.raises(SystemExit, match="unknown key 'lrr' in optim_wrapper.optimizer"):
        merge_cfg_options(Config.fromfile(cfg_path), {'optim_wrapper.optimizer.lrr': 0.1})
    with pytest.raises(SystemExit, match="unknown key 'bakbone'"):
        merge_cfg_options(Config.fromfile(cfg_path), {'model.bakbone.arch': 's'})
    with pytest.raises(SystemExit, match='no index'):
        merge_cfg_options(Config.fromfile(cfg_path), {'train_dataloader.dataset.pipeline.99.type': 'X'})
    cfg = Config.fromfile(cfg_path)  # existing keys, constructor arguments and Runner arguments are accepted
    merge_cfg_options(cfg, {'optim_wrapper.optimizer.lr': 0.5, 'model.backbone.with_cp': True,
                            'train_dataloader.dataset.pipeline.0.type': 'LoadImageFromFile', 'randomness': {}})
    assert cfg.optim_wrapper.optimizer.lr == 0.5 and cfg.model.backbone.with_cp


def test_bad_annotations_are_refused_naming_the_file(tmp_path):
    import json
    from mmengine.config import Config
    from overlock_core.mm.data import check_datasets

    def coco_cfg(ann):
        return Config(dict(default_scope='mmdet', train_dataloader=dict(dataset=dict(
            type='RepeatDataset', times=2, dataset=dict(type='CocoDataset', data_root=str(tmp_path),
                                                        ann_file=ann, data_prefix=dict(img='img/'))))))
    (tmp_path / 'img').mkdir()
    (tmp_path / 'img' / 'a.jpg').write_bytes(b'x')
    (tmp_path / 'empty.json').write_text('')
    (tmp_path / 'broken.json').write_text('{"images": [')
    (tmp_path / 'noimg.json').write_text(json.dumps({'images': [], 'annotations': []}))
    (tmp_path / 'missing.json').write_text(json.dumps({'images': [{'id': 1, 'file_name': 'a.jpg'},
                                                                  {'id': 2, 'file_name': 'gone.jpg'}]}))
    (tmp_path / 'ok.json').write_text(json.dumps({'images': [{'id': 1, 'file_name': 'a.jpg'}]}))
    for ann, msg in [('nope.json', 'nope.json not found'), ('empty.json', 'empty.json is empty'),
                     ('broken.json', 'broken.json is not valid JSON'), ('noimg.json', 'lists no images'),
                     ('missing.json', '1 of 2 images listed in .*missing.json are missing .*gone.jpg')]:
        with pytest.raises(SystemExit, match=msg):
            check_datasets(coco_cfg(ann))
    check_datasets(coco_cfg('ok.json'))

    seg = Config(dict(default_scope='mmseg', val_dataloader=dict(dataset=dict(
        type='ADE20KDataset', data_root=str(tmp_path), data_prefix=dict(img_path='simg', seg_map_path='sann')))))
    with pytest.raises(SystemExit, match='image folder .*simg not found'):
        check_datasets(seg)
    (tmp_path / 'simg').mkdir()
    (tmp_path / 'sann').mkdir()
    with pytest.raises(SystemExit, match='has no \\*.jpg images'):
        check_datasets(seg)
    (tmp_path / 'simg' / 'b.jpg').write_bytes(b'x')
    with pytest.raises(SystemExit, match='1 of 1 images .* no label map .*b.jpg'):
        check_datasets(seg)
    (tmp_path / 'sann' / 'b.png').write_bytes(b'x')
    check_datasets(seg)


def test_training_skips_an_unreadable_image_with_a_counted_warning(tmp_path):
    import cv2
    import numpy as np
    from mmengine.config import Config
    from overlock_core.mm import data
    cfg = Config(dict(train_dataloader=dict(dataset=dict(type='CocoDataset', pipeline=[
        dict(type='LoadImageFromFile'), dict(type='LoadAnnotations')]))))
    data.use_safe_image_loading(cfg)
    assert cfg.train_dataloader.dataset.pipeline[0].type == 'SafeLoadImageFromFile'
    from mmcv.transforms.builder import TRANSFORMS
    load = TRANSFORMS.build(dict(type='SafeLoadImageFromFile'))
    good, gray, bad = tmp_path / 'good.png', tmp_path / 'gray.png', tmp_path / 'bad.jpg'
    cv2.imwrite(str(good), np.zeros((4, 5, 4), np.uint8))  # RGBA: converted to 3 channels
    cv2.imwrite(str(gray), np.zeros((4, 5), np.uint8))  # grayscale: converted to 3 channels
    bad.write_bytes(b'\xff\xd8\xff\xe0 truncated')
    assert load(dict(img_path=str(good)))['img'].shape == (4, 5, 3)
    assert load(dict(img_path=str(gray)))['img'].shape == (4, 5, 3)
    before = data.SafeLoadImageFromFile.skipped
    with pytest.warns(UserWarning, match='skipping unreadable image .*bad.jpg'):
        assert load(dict(img_path=str(bad))) is None
    assert data.SafeLoadImageFromFile.skipped == before + 1
