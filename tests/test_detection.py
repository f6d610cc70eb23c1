"""Detection (mmdet 3.3.0): Mask R-CNN + test_overlock trains on a generated COCO-format dataset with a falling loss,
CocoMetric returns bbox and segm AP, tools/test.py writes results.json, a saved checkpoint resumes (through the
safe-load allow-list), and a 2-process gloo run through tools/dist_train.sh works (heavy)."""
import json
import os
import os.path as osp
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
CLASSES = ('circle', 'square', 'triangle')


def make_coco(root, n_train=16, n_val=4, size=64, seed=0):
    """COCO instances with polygon masks: 1-2 shapes (circle / square / triangle) of known geometry per image."""
    rng = np.random.default_rng(seed)
    cats = [dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)]
    for split, n in (('train', n_train), ('val', n_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = np.full((size, size, 3), int(rng.integers(60, 120)), np.uint8)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            placed = []
            for _ in range(int(rng.integers(1, 3))):
                r = int(rng.integers(8, 15))
                for _try in range(30):
                    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
                    if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in placed):
                        break
                else:
                    continue
                placed.append((cx, cy, r))
                k = int(rng.integers(0, 3))
                if k == 0:
                    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                    poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
                elif k == 1:
                    poly = np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
                else:
                    poly = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
                poly = np.round(poly).astype(np.int32)
                cv2.fillPoly(img, [poly], [(230, 60, 60), (60, 200, 60), (60, 60, 230)][k])
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=k + 1, iscrowd=0,
                                 bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                                 area=float(cv2.contourArea(poly.astype(np.float32))),
                                 segmentation=[poly.astype(float).ravel().tolist()]))
            name = f'{split}_{i:03d}.png'
            cv2.imwrite(osp.join(root, split, name), img[..., ::-1])
            images.append(dict(id=i + 1, file_name=name, height=size, width=size))
        os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=anns, categories=cats), f)


def write_cfg(path, data_root, batch_size=4, **extra):
    """A config inheriting configs/det/demo_maskrcnn.py, shrunk to 64 px images and the generated dataset."""
    lines = [f"_base_ = ['{ROOT}/configs/det/demo_maskrcnn.py']",
             f"data_root = '{data_root}/'",
             "img_scale = (64, 64)",
             "train_pipeline = [dict(type='LoadImageFromFile'),",
             "    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),",
             "    dict(type='Resize', scale=img_scale, keep_ratio=True), dict(type='RandomFlip', prob=0.5),",
             "    dict(type='PackDetInputs')]",
             f"train_dataloader = dict(batch_size={batch_size}, num_workers=0, persistent_workers=False,",
             "                        dataset=dict(data_root=data_root, pipeline=train_pipeline))",
             "val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))",
             "test_dataloader = val_dataloader",
             "val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')",
             "test_evaluator = val_evaluator"]
    lines += [f'{k} = {v}' for k, v in extra.items()]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return str(path)


def run_tool(script, *args, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=ROOT, **(env or {}))
    cmd = [PY, osp.join(ROOT, 'tools', script), *map(str, args)] if script.endswith('.py') else \
        ['bash', osp.join(ROOT, 'tools', script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f'{script} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}')
    return p


def read_scalars(work_dir):
    files = sorted(osp.join(dp, f) for dp, _, fs in os.walk(work_dir) for f in fs if f == 'scalars.json')
    assert files, f'no scalars.json under {work_dir}'
    rows = []
    for f in files:
        with open(f) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


SCHED = ("[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4), "
         "dict(type='MultiStepLR', begin=0, end={e}, by_epoch=True, milestones=[{m}], gamma=0.1)]")


@pytest.fixture(scope='module')
def det_run(tmp_path_factory):
    """24 epochs x 4 iterations of Mask R-CNN + test_overlock on the generated data (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp('det')
    data = tmp / 'coco'
    make_coco(str(data))
    cfg = write_cfg(tmp / 'cfg.py', str(data),
                    train_cfg="dict(max_epochs=24, val_interval=24)",
                    param_scheduler=SCHED.format(e=24, m=21),
                    default_hooks="dict(logger=dict(interval=1), checkpoint=dict(interval=4, save_best=None))",
                    randomness="dict(seed=0)")  # unseeded, 16 epochs gave AP 0.006-0.13 from run to run
    work = tmp / 'work'
    run_tool('train.py', cfg, '--work-dir', work)
    return dict(cfg=cfg, work=str(work), data=str(data))


def test_maskrcnn_trains_with_falling_loss_and_coco_ap(det_run):
    rows = read_scalars(det_run['work'])
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) >= 30
    first, last = np.mean(losses[:4]), np.mean(losses[-6:])
    assert last < 0.8 * first, losses
    metric = [r for r in rows if 'coco/bbox_mAP' in r][-1]
    assert 0 <= metric['coco/bbox_mAP'] <= 1 and 0 <= metric['coco/segm_mAP'] <= 1
    assert metric['coco/bbox_mAP'] > 0.02, metric  # it localises (0.067 here; near 0 with misread RoI maps)
    for k in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert any(k in r for r in rows), k


def test_test_tool_writes_results_json(det_run, tmp_path):
    wd = tmp_path / 'test'
    run_tool('test.py', det_run['cfg'], osp.join(det_run['work'], 'epoch_24.pth'), '--work-dir', wd,
             '--out', tmp_path / 'preds.pkl')
    res = json.load(open(wd / 'results.json'))
    assert res['task'] == 'det' and 0 <= res['bbox_mAP'] <= 100 and 0 <= res['segm_mAP'] <= 100
    assert osp.getsize(tmp_path / 'preds.pkl') > 0


def test_resume_from_saved_checkpoint(det_run):
    """`--resume` (auto) continues from epoch_24.pth: mmengine's torch.load(weights_only=True) + our allow-list
    (installed by tools/train.py)."""
    from overlock_core.checkpoint import load_checkpoint_file
    from overlock_core.mm import mmengine_checkpoint_globals
    p = run_tool('train.py', det_run['cfg'], '--work-dir', det_run['work'], '--resume',
                 '--cfg-options', 'train_cfg.max_epochs=25', 'train_cfg.val_interval=100',
                 'default_hooks.checkpoint.interval=1')
    log = p.stdout + p.stderr
    assert 'resumed epoch: 24, iter: 96' in log, log[-3000:]
    with mmengine_checkpoint_globals():  # a Runner checkpoint: message_hub holds mmengine/numpy objects
        ck = load_checkpoint_file(osp.join(det_run['work'], 'epoch_25.pth'))
    assert ck['meta']['epoch'] == 25 and ck['meta']['iter'] == 100


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_process_gloo_training(tmp_path):
    """tools/dist_train.sh CONFIG 2 on CPU: torchrun, --launcher pytorch, gloo, CPU DDP wrapper."""
    data = tmp_path / 'coco'
    make_coco(str(data), n_train=8, n_val=2)
    cfg = write_cfg(tmp_path / 'cfg.py', str(data), train_cfg="dict(max_epochs=2, val_interval=2)",
                    param_scheduler=SCHED.format(e=2, m=1),
                    batch_size=2,
                    default_hooks="dict(logger=dict(interval=1), checkpoint=dict(interval=2, save_best=None))")
    work = tmp_path / 'work'
    p = run_tool('dist_train.sh', cfg, 2, '--work-dir', work, env=dict(PORT=str(_free_port())), timeout=400)
    log = p.stdout + p.stderr
    assert 'world_size: 2' in log or 'world size: 2' in log.lower() or osp.isfile(work / 'epoch_2.pth'), log[-3000:]
    assert osp.isfile(work / 'epoch_2.pth')
    rows = read_scalars(str(work))
    assert any('coco/bbox_mAP' in r for r in rows)
    # 8 images / (2 processes x 2 per GPU) = 2 iterations per epoch
    assert max(r.get('iter', 0) for r in rows if 'loss' in r) == 4


def test_backbone_maps_are_nchw_so_mmcv_roialign_reads_them_right():
    """The dense maps leave the backbone NCHW-contiguous: mmcv's RoIAlign indexes its input as NCHW, and on the
    channels-last maps the LayerNorms produce it pooled wrong values (the Mask R-CNN demo then stayed near AP 0)."""
    import torch
    import torchvision
    from mmcv.ops import RoIAlign
    import overlock_core.mm  # noqa: F401
    from mmengine.registry import MODELS
    backbone = MODELS.build(dict(type='OverLoCKBackbone', arch='test', dense='det', drop_path_rate=0.)).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert all(m.is_contiguous() for m in maps)
    rois = torch.tensor([[0, 2., 3., 40., 30.]])
    ours = RoIAlign((7, 7), 0.25, 2)(maps[0], rois)
    torch.testing.assert_close(ours, torchvision.ops.roi_align(maps[0], rois, (7, 7), 0.25, 2, aligned=True))
