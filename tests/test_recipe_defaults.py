"""Every paper config runs the authors' recipe by default (decay groups, precision); the improvements are switches,
each changing exactly the groups it names."""
import glob
import json
import os
import sys

import pytest
import torch
from timm.optim import create_optimizer_v2

from classification.common import amp_dtype
from classification.config import load_config
from classification.train import decay_groups
from overlock_core.models import OverLoCK, extended_no_weight_decay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLS_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs/cls/overlock_*.yaml')))
DENSE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs/det/overlock_*.py'))
                       + glob.glob(os.path.join(ROOT, 'configs/seg/overlock_*.py')))
# >1-d parameters the authors' timm AdamW decayed: layer scales, GRN gamma/beta, rpb tables
EXTENDED_ONLY = ('blocks3.0.ls.weight', 'blocks1.0.proj.7.gamma', 'blocks1.0.proj.7.beta', 'sub_blocks3.0.rpb1',
                 'sub_blocks3.1.x_scale.weight', 'sub_blocks4.0.ls2.weight', 'sub_blocks4.0.mlp.3.gamma')


def _no_decay_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}


@pytest.mark.parametrize('path', CLS_CONFIGS, ids=os.path.basename)
def test_cls_paper_configs_default_to_the_authors_recipe(path):
    t = load_config(path)['train']
    assert t['decay_groups'] == 'authors' and t['amp'] and t['amp_dtype'] == 'auto'
    assert t['weight_decay'] == 0.05 and t['clip_grad'] == 5.0 and t['seed'] == 42 and t['cudnn_benchmark']
    cfg = {'train': t}
    assert amp_dtype(cfg, torch.device('cuda')) == torch.float16  # fp16 + GradScaler, as the authors trained
    assert amp_dtype(cfg, torch.device('cpu')) is None
    assert amp_dtype({'train': dict(t, amp_dtype='bfloat16')}, torch.device('cuda')) == torch.bfloat16


def test_validate_evaluates_in_fp32_by_default():
    from classification.validate import parse_args
    assert not parse_args(['c.yaml', 'w.pth']).amp and parse_args(['c.yaml', 'w.pth', '--amp']).amp


def test_cls_decay_groups_authors_and_extended():
    torch.manual_seed(0)
    model = OverLoCK('t', aux_head=True, num_classes=10)
    assert model.no_weight_decay() == set()
    t = dict(load_config(CLS_CONFIGS[0])['train'])
    authors = _no_decay_names(model, create_optimizer_v2(decay_groups(model, t), 'adamw', lr=1e-3, weight_decay=0.05))
    # timm's rule alone: exactly the 1-d tensors and biases
    assert authors == {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith('.bias')}
    assert not authors & set(EXTENDED_ONLY)
    t['decay_groups'] = 'extended'
    extended = _no_decay_names(model, create_optimizer_v2(decay_groups(model, t), 'adamw', lr=1e-3,
                                                          weight_decay=0.05))
    added = extended - authors
    assert set(EXTENDED_ONLY) <= added
    assert added == {n for n in extended_no_weight_decay(model) if model.get_parameter(n).ndim > 1}
    assert len(added) == 178  # OverLoCK-T: 178 tensors the authors decayed
    assert all(not n.endswith(('lk_origin.weight', 'proj.4.weight', 'weight_proj.weight')) for n in added)


def test_cls_decay_groups_name_is_checked(tmp_path):
    from classification.train import main
    with pytest.raises(SystemExit, match='decay_groups'):
        main([os.path.join(ROOT, 'configs/cls/demo.yaml'), '--cfg-options', f'data.data_dir={tmp_path}',
              'train.decay_groups=nodecay'])


def _mm_groups(model, paramwise_cfg):
    pytest.importorskip('mmengine')
    from overlock_core.mm.optim import OverLoCKOptimWrapperConstructor
    ctor = OverLoCKOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)), paramwise_cfg)
    wrapper = ctor(model)
    return _no_decay_names(model, wrapper.optimizer)


def test_mm_constructor_defaults_to_the_authors_groups():
    model = torch.nn.Module()
    model.backbone = OverLoCK('test', dense='det')
    default = _mm_groups(model, None)
    assert default == _mm_groups(model, dict(official=True))
    # the authors' rule: only names containing 'norm' (norm1/norm2/extra_norm LayerNorms) are exempt
    assert default and all('norm' in n for n in default)
    assert 'backbone.sub_blocks3.0.rpb2' not in default and 'backbone.patch_embed1.1.weight' not in default
    extended = _mm_groups(model, dict(official=False))
    for name in ('backbone.sub_blocks3.0.rpb2', 'backbone.patch_embed1.1.weight', 'backbone.blocks1.0.proj.7.gamma',
                 'backbone.sub_blocks4.0.ls1.weight', 'backbone.h_proj.1.weight', 'backbone.blocks1.0.dwconv.bias'):
        assert name in extended and name not in default
    assert 'backbone.blocks1.0.proj.4.weight' not in extended


@pytest.mark.parametrize('path', DENSE_CONFIGS, ids=os.path.basename)
def test_dense_paper_configs_default_to_the_authors_recipe(path):
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    ow = cfg.optim_wrapper
    assert ow.constructor == 'OverLoCKOptimWrapperConstructor'
    assert ow.get('paramwise_cfg', {}).get('official', True) is True
    assert ow.get('type', 'OptimWrapper') == 'OptimWrapper'  # fp32, as the authors; --amp switches
    assert ow.optimizer.type == 'AdamW' and ow.optimizer.weight_decay == (0.01 if '/seg/' in path else 0.05)
    name = os.path.basename(path)
    if 'cascade' in name or '3x' in name:
        assert ow.optimizer.lr == 1e-4
    elif '/det/' in path:
        assert ow.optimizer.lr == 2e-4
    else:
        assert ow.optimizer.lr == 6e-5


def test_result_tables_say_which_figure_they_report(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import collect_results

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    write(tmp_path / 'overlock_t' / 'results.json',
          dict(task='cls', model='overlock_t', figure='last epoch', top1=84.0, ema_top1=84.1, epochs=310,
               best=dict(top1=84.2, epoch=290, ema_top1=84.3, ema_epoch=305)))
    write(tmp_path / 'xt_eval' / 'results.json',
          dict(task='cls', model='overlock_xt', top1=82.5, checkpoint='/w/checkpoint-best-ema.pth',
               figure='checkpoint evaluation (EMA weights)'))
    write(tmp_path / 'overlock_b' / 'log.jsonl', '{"epoch": 0, "top1": 10.0}\n{"epoch": 1, "top1": 9.0}\n')
    write(tmp_path / 'overlock_b' / 'config.yaml', 'model: {name: overlock_b}\n')
    rows = [dict(loss=1.0, step=10), {'coco/bbox_mAP': 0.40, 'step': 1}, {'coco/bbox_mAP': 0.38, 'step': 2}]
    write(tmp_path / 'overlock_t_maskrcnn_1x' / '20260101_000000' / 'vis_data' / 'scalars.json',
          '\n'.join(map(json.dumps, rows)))
    write(tmp_path / 'overlock_s_maskrcnn_3x' / 'results.json',
          dict(task='det', bbox_mAP=51.0, segm_mAP=45.0, checkpoint='/w/epoch_36.pth'))
    tables = collect_results.build_tables(collect_results.find_runs([tmp_path]), paper_rows=False)
    header, rows = tables['cls']
    fig = {r[0]: r[header.index('Figure')] for r in rows}
    top1 = {r[0]: r[1] for r in rows}
    assert fig['OverLoCK-T'] == 'last epoch; best 84.2 @ epoch 290; EMA last 84.1, best 84.3 @ epoch 305'
    assert top1['OverLoCK-T'] == '84.0'
    assert fig['OverLoCK-XT'] == 'checkpoint evaluation (EMA weights): checkpoint-best-ema.pth'
    assert top1['OverLoCK-B'] == '9.0' and fig['OverLoCK-B'].startswith('last logged epoch')  # last, not best
    header, rows = tables['det']
    fig = {(r[0], r[2]): (r[3], r[header.index('Figure')]) for r in rows}
    assert fig[('OverLoCK-T', '1x')] == ('38.0', 'last validation; best 40.0 @ 1')
    assert fig[('OverLoCK-S', '3x')] == ('51.0', 'test of epoch_36.pth')
