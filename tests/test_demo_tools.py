"""Tests of the demo tooling: demo data, result collection, sweeps, ERF plots and (heavy) the whole demo.

Everything runs on tiny generated data in tmp_path; the mmdet/mmseg checks load the generated annotations
through the real dataset classes (skipped when mmcv is not importable).
"""
import csv
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
import collect_results  # noqa: E402
import make_demo_data  # noqa: E402
import sweep  # noqa: E402

SMALL = ['--cls', '3', '2', '--coco', '4', '3', '--ade', '4', '3']
SHAPES = ('circle', 'square', 'triangle')


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_data')
    assert make_demo_data.main(['--out', str(root), *SMALL]) == 0
    return root


# ------------------------------------------------------------------ demo data
def test_demo_data_is_deterministic(demo_data, tmp_path):
    assert make_demo_data.main(['--out', str(tmp_path), *SMALL]) == 0
    a, b = _digest(demo_data), _digest(tmp_path)
    assert a == b
    assert len([k for k in a if k.startswith('cls/train/')]) == 4 * 3
    assert len([k for k in a if k.startswith('ade/annotations/validation/')]) == 3
    other = tmp_path / 'other_seed'
    make_demo_data.main(['--out', str(other), '--seed', '1', *SMALL])
    assert _digest(other)['cls/train/circle/circle_0000.png'] != a['cls/train/circle/circle_0000.png']


def test_demo_data_layout_and_annotations(demo_data):
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(demo_data / 'cls' / 'train'))
    assert ds.classes == sorted(make_demo_data.CLS_CLASSES) and len(ds) == 12
    img, _ = ds[0]
    assert img.size == (64, 64)

    from pycocotools.coco import COCO
    coco = COCO(str(demo_data / 'coco' / 'annotations' / 'instances_train.json'))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann['bbox']
        assert ann['iscrowd'] == 0 and w > 0 and h > 0 and 0 <= x and x + w <= 128 and y + h <= 128
        mask = coco.annToMask(ann)
        assert abs(mask.sum() - ann['area']) / ann['area'] < 0.25  # polygon area ~ rasterised mask

    lab = np.asarray(Image.open(demo_data / 'ade' / 'annotations' / 'training' / 'training_0000.png'))
    assert lab.shape == (128, 128) and set(np.unique(lab)) <= {0, 1, 2, 3} and lab.max() > 0
    assert (lab == 0).any()  # background pixels: class 0 of SEG_CLASSES
    assert make_demo_data.SEG_CLASSES == ('background',) + SHAPES
    assert json.loads((demo_data / 'meta.json').read_text())['seg_classes'] == list(make_demo_data.SEG_CLASSES)
    assert Image.open(demo_data / 'ade' / 'images' / 'training' / 'training_0000.jpg').size == (128, 128)


def _mm_available():
    return importlib.util.find_spec('mmcv') is not None and importlib.util.find_spec('mmcv._ext') is not None


@pytest.mark.skipif(not _mm_available(), reason='mmcv (with ops) is not installed')
def test_demo_data_loads_with_mmdet_and_mmseg(demo_data):
    from mmdet.datasets import CocoDataset
    det = CocoDataset(data_root=str(demo_data / 'coco'), ann_file='annotations/instances_val.json',
                      data_prefix=dict(img='val/'), metainfo=dict(classes=SHAPES), pipeline=[], test_mode=True)
    assert len(det) == 3 and det.metainfo['classes'] == SHAPES
    info = det[0]
    assert info['img_path'].endswith('.png') and info['instances']
    inst = info['instances'][0]
    assert inst['bbox_label'] in (0, 1, 2) and len(inst['mask'][0]) >= 6

    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations
    classes = make_demo_data.SEG_CLASSES
    seg = BaseSegDataset(data_root=str(demo_data / 'ade'), data_prefix=dict(img_path='images/validation',
                         seg_map_path='annotations/validation'), img_suffix='.jpg', seg_map_suffix='.png',
                         reduce_zero_label=False, metainfo=dict(classes=classes), pipeline=[])
    assert len(seg) == 3 and seg.metainfo['classes'] == classes and seg[0]['label_map'] is None
    gts = [LoadAnnotations(reduce_zero_label=False)(dict(seg[i]))['gt_seg_map'] for i in range(len(seg))]
    # every pixel is one of the four classes (none ignored): background 0 and at least one shape each
    for gt in gts:
        assert set(np.unique(gt)) <= {0, 1, 2, 3} and (gt == 0).any() and (gt > 0).any()


@pytest.mark.skipif(not _mm_available(), reason='mmcv (with ops) is not installed')
@pytest.mark.parametrize('config', ['configs/det/demo_maskrcnn.py', 'configs/seg/demo_upernet.py'])
def test_demo_configs_read_the_demo_data(config, demo_data):
    """The demo configs' own train datasets, pointed at the generated data, find images and labels."""
    if not (ROOT / config).is_file():
        pytest.skip(f'{config} not written yet')
    from mmengine.config import Config
    from mmengine.registry import DATASETS, init_default_scope
    cfg = Config.fromfile(str(ROOT / config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ds_cfg = cfg.train_dataloader.dataset
    while 'dataset' in ds_cfg:  # RepeatDataset and friends
        ds_cfg = ds_cfg.dataset
    ds_cfg.data_root = str(demo_data / ('coco' if '/det/' in config else 'ade')) + '/'
    ds_cfg.pipeline = []
    ds = DATASETS.build(ds_cfg)
    assert len(ds) > 0
    assert ds.metainfo['classes'] == (SHAPES if '/det/' in config else make_demo_data.SEG_CLASSES)


@pytest.mark.skipif(not _mm_available(), reason='mmcv (with ops) is not installed')
def test_seg_demo_classes_agree_everywhere():
    """Demo data, config (metainfo, heads, label loading) and the demo's picture use the same 4 classes, background
    included and scored, so the prediction picture shows what the mIoU measures."""
    from mmengine.config import Config
    import demo
    classes = make_demo_data.SEG_CLASSES
    assert classes[0] == 'background' and len(classes) == 4
    cfg = Config.fromfile(str(ROOT / 'configs' / 'seg' / 'demo_upernet.py'))
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        ds = loader.dataset
        assert tuple(ds.metainfo['classes']) == classes and ds.reduce_zero_label is False
        assert [list(c) for c in demo.SEG_COLOURS] == [list(c) for c in ds.metainfo['palette']]
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == len(classes)
    loads = [t for t in cfg.train_pipeline + cfg.test_pipeline if t['type'] == 'LoadAnnotations']
    loads += [t for step in cfg.tta_pipeline[1]['transforms'] for t in step if t['type'] == 'LoadAnnotations']
    assert len(loads) == 3 and all(t['reduce_zero_label'] is False for t in loads)
    assert demo.SEG_CLASSES == classes and len(set(map(tuple, demo.SEG_COLOURS))) == len(classes)


def test_seg_demo_picture_draws_background_as_a_class():
    import demo
    labels = np.array([[0, 1], [2, 3], [255, 0]], np.uint8)
    rgb = demo.colour_labels(labels)
    assert rgb.shape == (3, 2, 3) and rgb.dtype == np.uint8
    assert [tuple(rgb[0, 0]), tuple(rgb[0, 1]), tuple(rgb[1, 0]), tuple(rgb[1, 1])] == \
        [tuple(c) for c in demo.SEG_COLOURS]
    assert tuple(rgb[2, 0]) == demo.IGNORE_COLOUR and demo.IGNORE_COLOUR not in map(tuple, demo.SEG_COLOURS)
    assert tuple(rgb[2, 1]) == tuple(demo.SEG_COLOURS[0])  # background: its own colour, not the ignore colour


# ------------------------------------------------------------------ collect_results
def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_collect_results_tables(tmp_path):
    wd = tmp_path / 'work_dirs'
    _write(wd / 'overlock_t' / 'results.json',
           dict(task='cls', model='overlock_t', top1=84.0, top5=96.9, params=33_467_040, epochs=300))
    _write(wd / 'overlock_t' / 'log.jsonl', '{"epoch": 0, "train_loss": 6.9, "top1": 0.1}\n')
    scal = [dict(lr=1e-4, loss=2.0, iter=50, step=50), dict({'coco/bbox_mAP': 0.4, 'coco/segm_mAP': 0.35}, step=1),
            dict({'coco/bbox_mAP': 0.512, 'coco/segm_mAP': 0.449}, step=36)]
    _write(wd / 'overlock_s_maskrcnn_3x' / '20250101_000000' / 'vis_data' / 'scalars.json',
           '\n'.join(map(json.dumps, scal)) + '\n')
    _write(wd / 'b_ade' / 'results.json', dict(task='seg', mIoU=51.0, aAcc=83.0, tta=False,
                                               config='/x/configs/seg/overlock_b_upernet_160k_ade20k.py'))
    _write(wd / 'b_ade' / 'ms' / 'results.json', dict(task='seg', mIoU=52.04, tta=True))
    _write(wd / 'sweep_demo' / 'kernel_sizes-7.7.7.7' / 'sweep_cell.json',
           dict(config='configs/cls/overlock_t.yaml', overrides={'model.kwargs.kernel_sizes': [7, 7, 7, 7]},
                returncode=0))
    _write(wd / 'sweep_demo' / 'kernel_sizes-7.7.7.7' / 'results.json', dict(task='cls', top1=83.5))

    cx = tmp_path / 'complexity.json'  # the layout of tools/complexity.py --json
    _write(cx, dict(variants=[dict(variant='t', params_train=34_990_472, params_deploy=33_467_040, gmacs_deploy=5.65,
                                   gmacs_train=5.99, gmacs_paper_convention=5.51)], dense=[], models=[]))

    out = tmp_path / 'out'
    assert collect_results.main([str(wd), '--out', str(out), '--complexity', str(cx)]) == 0
    md = (out / 'results.md').read_text()
    assert '| OverLoCK-T | 84.0 | 84.2 | -0.2 | 33.5 | 33 | 5.7 | 5.5 |' in md
    assert '| OverLoCK-S | Mask R-CNN | 3x | 51.2 | 51.0 | +0.2 | 44.9 | 45.0 | -0.1 |' in md
    assert '| OverLoCK-B | UperNet | 51.0 | 51.7 | -0.7 | 52.0 | - |' in md
    assert '| OverLoCK-XT | - | 82.7 | - |' in md  # paper rows without a run stay in the table
    with open(out / 'results_det.csv') as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r['Backbone'] == 'OverLoCK-S' and r['Schedule'] == '3x')
    assert row['AP^b'] == '51.2' and row['AP^m (paper)'] == '45.0' and row['work dir'].endswith('maskrcnn_3x')
    with open(out / 'results_sweep.csv') as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 1 and cells[0]['Overrides'] == 'model.kwargs.kernel_sizes=[7,7,7,7]'
    assert cells[0]['Metric'] == 'top1' and cells[0]['Value'] == '83.5' and cells[0]['Status'] == 'ok'


def test_identify_config_names():
    assert collect_results.identify('overlock_xt.yaml') == ('xt', None, None)
    assert collect_results.identify('overlock_b_maskrcnn_1x.py') == ('b', 'maskrcnn', '1x')
    assert collect_results.identify('/a/overlock_t_cascade_maskrcnn_3x.py') == ('t', 'cascade_maskrcnn', '3x')
    assert collect_results.identify('overlock_s_upernet_160k_ade20k.py') == ('s', 'upernet', None)
    assert collect_results.identify(None, 'misc', 'demo_upernet') == ('test', None, None)


# ------------------------------------------------------------------ sweep
GRID = ['model.kernel_sizes=[[17,15,13,7],[7,7,7,7]]', 'model.smk_size=[3,5]', 'model.use_context=[true,false]',
        'model.mixer=[contmix,static]']


def test_sweep_expands_grid_per_config_type():
    cls = sweep.build_commands('configs/cls/overlock_t.yaml', sweep.parse_grid(GRID, mm=False), 1, 'w')
    det = sweep.build_commands('configs/det/overlock_t_maskrcnn_1x.py', sweep.parse_grid(GRID, mm=True), 2, 'w')
    assert len(cls) == len(det) == 16
    assert len({c[0] for c in cls}) == 16  # one work dir per cell
    name, wd, ov, argv = cls[-1]
    assert ov == {'model.kwargs.kernel_sizes': [7, 7, 7, 7], 'model.kwargs.smk_size': 5,
                  'model.kwargs.use_context': False, 'model.kwargs.mixer': 'static'}
    assert name == 'kernel_sizes-7.7.7.7_smk_size-5_use_context-false_mixer-static' and wd == Path('w') / name
    assert argv == ['bash', 'tools/dist_train.sh', 'configs/cls/overlock_t.yaml', '1', '--work-dir', f'w/{name}',
                    '--cfg-options', 'model.kwargs.kernel_sizes=[7,7,7,7]', 'model.kwargs.smk_size=5',
                    'model.kwargs.use_context=false', 'model.kwargs.mixer=static']
    assert det[0][3][3] == '2' and 'model.backbone.kernel_sizes=[17,15,13,7]' in det[0][3]
    assert sweep.map_key('train_cfg.max_epochs', mm=True) == 'train_cfg.max_epochs'


def test_sweep_dry_run_prints_commands(capsys):
    assert sweep.main(['configs/det/overlock_s_maskrcnn_1x.py', '--dry-run', '--work-root', 'wd', '--grid',
                       'mixer=[contmix,static]', '--cfg-options', 'train_cfg.max_epochs=1']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('[sweep] 2 cell(s)')
    assert lines[2] == ('bash tools/dist_train.sh configs/det/overlock_s_maskrcnn_1x.py 1 --work-dir wd/mixer-static '
                        '--cfg-options model.backbone.mixer=static train_cfg.max_epochs=1')
    assert not Path('wd').exists()


# ------------------------------------------------------------------ ERF
def test_visualize_erf_writes_png(tmp_path):
    import timm
    try:
        import overlock_core  # noqa: F401
    except ImportError:
        pass
    model = 'test_overlock' if 'test_overlock' in timm.list_models('test_overlock') else 'test_convnext'
    import visualize_erf
    out = tmp_path / 'erf.png'
    assert visualize_erf.main(['--model', model, '--stage', '2', '--size', '64', '--num-images', '2',
                               '--out', str(out), '--save-npy']) == 0
    img = Image.open(out)
    assert img.format == 'PNG' and img.size[0] > 100
    erf = np.load(out.with_suffix('.npy'))
    assert erf.shape == (64, 64) and erf.max() > 0 and np.isfinite(erf).all()


def test_erf_area_ratio_is_monotone():
    import visualize_erf
    yy, xx = np.mgrid[0:65, 0:65]
    erf = np.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / 50.0)
    r = visualize_erf.area_ratio(erf)
    assert r[0] < r[1] < r[2] <= 1.0


# ------------------------------------------------------------------ whole demo
def _demo_ready():
    need = ['configs/cls/demo.yaml', 'configs/det/demo_maskrcnn.py', 'configs/seg/demo_upernet.py',
            'tools/dist_train.sh', 'tools/dist_test.sh', 'classification/train.py', 'tools/train.py']
    return all((ROOT / p).is_file() for p in need) and _mm_available()


@pytest.mark.heavy
@pytest.mark.skipif(not _demo_ready(), reason='demo configs / pipelines / mmcv not available yet')
def test_demo_quick(tmp_path):
    out, wd = tmp_path / 'report', tmp_path / 'work_dirs'
    proc = subprocess.run([sys.executable, 'tools/demo.py', '--quick', '--skip-complexity', '--out', str(out),
                           '--work-root', str(wd)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / 'report.md').read_text()
    assert 'FAILED' not in report and 'Top-1' in report and 'mIoU' in report
    for png in ('curves_cls.png', 'curves_det.png', 'curves_seg.png', 'pred_det.png', 'pred_seg.png'):
        assert (out / png).is_file(), png
    assert json.loads((wd / 'demo_maskrcnn' / 'results.json').read_text())['task'] == 'det'
