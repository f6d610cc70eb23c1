"""Segmentation (mmseg 1.2.2): the AlignResize test transform, UperNet + test_overlock training / evaluation / TTA on a
generated ADE20K-layout dataset, and kill-and-resume reproducibility (heavy)."""
import json
import os
import re
import os.path as osp
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable


# ----------------------------------------------------------------------------------------------------- transform
@pytest.mark.parametrize('shape,scale', [((37, 53), (70, 40)), ((50, 123), (2048, 512)), ((97, 61), (64, 64)),
                                         ((64, 64), (64, 64))])
def test_align_resize_matches_definition(shape, scale):
    import mmcv
    from mmseg.registry import TRANSFORMS

    import segmentation  # noqa: F401
    h0, w0 = shape
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h0, w0, 3), dtype=np.uint8)
    seg = rng.integers(0, 4, (h0, w0), dtype=np.uint8)
    t = TRANSFORMS.build(dict(type='AlignResize', scale=scale, keep_ratio=True, size_divisor=32))
    out = t(dict(img=img.copy(), gt_seg_map=seg.copy(), img_shape=shape, ori_shape=shape, seg_fields=['gt_seg_map']))

    # definition: keep-ratio rescale into `scale` (bilinear image, nearest labels) ...
    step1 = mmcv.imrescale(img, scale, interpolation='bilinear')
    h1, w1 = step1.shape[:2]
    # ... then resize (not pad) up to the next multiple of 32: image bicubic, labels nearest
    h2, w2 = -(-h1 // 32) * 32, -(-w1 // 32) * 32
    expect_img = cv2.resize(step1, (w2, h2), interpolation=cv2.INTER_CUBIC) if (h2, w2) != (h1, w1) else step1
    seg1 = mmcv.imrescale(seg, scale, interpolation='nearest')
    expect_seg = cv2.resize(seg1, (w2, h2), interpolation=cv2.INTER_NEAREST) if (h2, w2) != (h1, w1) else seg1

    assert out['img'].shape == (h2, w2, 3) and h2 % 32 == 0 and w2 % 32 == 0
    assert h2 >= h1 and w2 >= w1 and h2 - h1 < 32 and w2 - w1 < 32
    np.testing.assert_array_equal(out['img'], expect_img)
    np.testing.assert_array_equal(out['gt_seg_map'], expect_seg)
    assert set(np.unique(out['gt_seg_map'])) <= set(np.unique(seg))  # nearest: no new label values
    assert tuple(out['img_shape']) == (h2, w2)
    assert out['scale_factor'] == pytest.approx((w2 / w0, h2 / h0))
    assert out['keep_ratio'] is True


def test_align_resize_keeps_short_side_rule():
    from mmseg.registry import TRANSFORMS

    import segmentation  # noqa: F401
    t = TRANSFORMS.build(dict(type='AlignResize', scale=(2048, 512), keep_ratio=True))
    out = t(dict(img=np.zeros((375, 500, 3), np.uint8)))
    assert out['img'].shape[:2] == (512, 704)  # 512 x 682.7 -> 683 -> next multiple of 32
    out = t(dict(img=np.zeros((100, 900, 3), np.uint8)))  # long side hits 2048 first
    assert out['img'].shape[:2] == (256, 2048)


# ----------------------------------------------------------------------------------------------------- data + runs
SHAPES = ('circle', 'square', 'triangle')


def make_ade(root, n_train=12, n_val=4, size=64, seed=0):
    """ADE20K layout: images/{training,validation}/*.jpg, annotations/.../*.png; 0 = background, 1..3 shapes (the
    demo config's four classes)."""
    rng = np.random.default_rng(seed)
    for split, n in (('training', n_train), ('validation', n_val)):
        os.makedirs(osp.join(root, 'images', split), exist_ok=True)
        os.makedirs(osp.join(root, 'annotations', split), exist_ok=True)
        for i in range(n):
            img = np.full((size, size, 3), rng.integers(60, 120), np.uint8)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            label = np.zeros((size, size), np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(0, 3))
                r = int(rng.integers(7, 14))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                colour = [(230, 60, 60), (60, 200, 60), (60, 60, 230)][k]
                for arr, val in ((img, colour), (label, k + 1)):
                    if k == 0:
                        cv2.circle(arr, (cx, cy), r, val, -1)
                    elif k == 1:
                        cv2.rectangle(arr, (cx - r, cy - r), (cx + r, cy + r), val, -1)
                    else:
                        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
                        cv2.fillPoly(arr, [pts], val)
            cv2.imwrite(osp.join(root, 'images', split, f'{i:03d}.jpg'), img[..., ::-1])
            cv2.imwrite(osp.join(root, 'annotations', split, f'{i:03d}.png'), label)


def write_cfg(path, data_root, model_extra='', **extra):
    """A config inheriting configs/seg/demo_upernet.py, shrunk to 64x64 crops and a generated dataset."""
    lines = [f"_base_ = ['{ROOT}/configs/seg/demo_upernet.py']",
             f"data_root = '{data_root}'",
             "crop_size = (64, 64)",
             "train_pipeline = [dict(type='LoadImageFromFile'),",
             "    dict(type='LoadAnnotations', reduce_zero_label=False),",
             "    dict(type='RandomResize', scale=(64, 64), ratio_range=(0.9, 1.2), keep_ratio=True),",
             "    dict(type='RandomCrop', crop_size=(64, 64)), dict(type='RandomFlip', prob=0.5),",
             "    dict(type='PackSegInputs')]",
             "train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,",
             "                        dataset=dict(data_root=data_root, pipeline=train_pipeline))",
             "val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))",
             "test_dataloader = val_dataloader",
             f"model = dict(data_preprocessor=dict(size=crop_size), {model_extra})"]
    lines += [f'{k} = {v}' for k, v in extra.items()]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return str(path)


def run_tool(script, *args, timeout=300, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.run([PY, osp.join(ROOT, 'tools', script), *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f'{script} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}')
    return p


def read_scalars(work_dir):
    files = sorted(
        osp.join(dp, f) for dp, _, fs in os.walk(work_dir) for f in fs if f == 'scalars.json')
    assert files, f'no scalars.json under {work_dir}'
    rows = []
    for f in files:
        with open(f) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def _mean(xs):
    return float(sum(xs) / len(xs))


@pytest.fixture(scope='module')
def seg_run(tmp_path_factory):
    """Train UperNet + test_overlock for 40 iterations on a generated dataset (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp('seg')
    data = tmp / 'ade'
    make_ade(str(data))
    cfg = write_cfg(tmp / 'cfg.py', str(data),
                    train_cfg="dict(type='IterBasedTrainLoop', max_iters=40, val_interval=40)",
                    param_scheduler="[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=5), "
                                    "dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=5, end=40)]",
                    default_hooks="dict(logger=dict(interval=1), checkpoint=dict(interval=40, save_best=None))")
    work = tmp / 'work'
    t0 = time.time()
    run_tool('train.py', cfg, '--work-dir', work)
    return dict(cfg=cfg, work=str(work), data=str(data), time=time.time() - t0)


def test_upernet_trains_with_falling_loss_and_miou(seg_run):
    rows = read_scalars(seg_run['work'])
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) >= 30
    assert _mean(losses[-8:]) < 0.8 * _mean(losses[:4]), losses
    metrics = [r for r in rows if 'mIoU' in r]
    assert metrics and 0 <= metrics[-1]['mIoU'] <= 100
    assert osp.isfile(osp.join(seg_run['work'], 'iter_40.pth'))
    # the per-class IoU table scores background next to the three shapes
    logs = [osp.join(dp, f) for dp, _, fs in os.walk(seg_run['work']) for f in fs if f.endswith('.log')]
    text = ''.join(open(f).read() for f in logs)
    for name in ('background', 'circle', 'square', 'triangle'):
        assert re.search(rf'\|\s*{name}\s*\|\s*([\d.]+|nan)\s*\|', text), name


def test_upernet_single_scale_and_tta_test(seg_run, tmp_path):
    ckpt = osp.join(seg_run['work'], 'iter_40.pth')
    for extra, name in (((), 'ss'), (('--tta',), 'tta')):
        wd = tmp_path / name
        run_tool('test.py', seg_run['cfg'], ckpt, '--work-dir', wd, *extra)
        res = json.load(open(wd / 'results.json'))
        assert res['task'] == 'seg' and 0 <= res['mIoU'] <= 100 and 0 <= res['aAcc'] <= 100
        assert res['tta'] == bool(extra)


# ----------------------------------------------------------------------------------------------------- kill/resume
def _state(path):
    from overlock_core.checkpoint import load_checkpoint_file
    from overlock_core.mm import mmengine_checkpoint_globals
    with mmengine_checkpoint_globals():  # a Runner checkpoint: message_hub holds mmengine/numpy objects
        return load_checkpoint_file(path)['state_dict']


@pytest.mark.heavy
def test_sigkill_then_resume_reproduces_uninterrupted_run(tmp_path):
    """SIGKILL mid-training, then `--resume`: the final weights equal those of an uninterrupted run."""
    data = tmp_path / 'ade'
    make_ade(str(data), n_train=8, n_val=2)
    cfg = write_cfg(tmp_path / 'cfg.py', str(data),
                    train_cfg="dict(type='IterBasedTrainLoop', max_iters=24, val_interval=1000)",
                    param_scheduler="[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=5), "
                                    "dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=5, end=24)]",
                    default_hooks="dict(logger=dict(interval=1), checkpoint=dict(interval=6, max_keep_ckpts=10, "
                                  "save_best=None))",
                    randomness="dict(seed=0)",
                    # no dropout: the only randomness left is the data pipeline, which resume replays
                    model_extra="decode_head=dict(dropout_ratio=0.0), auxiliary_head=dict(dropout_ratio=0.0)",
                    val_evaluator="dict(type='IoUMetric', iou_metrics=['mIoU'])")
    ref = tmp_path / 'ref'
    run_tool('train.py', cfg, '--work-dir', ref)

    work = tmp_path / 'killed'
    e = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=ROOT)
    proc = subprocess.Popen([PY, osp.join(ROOT, 'tools', 'train.py'), cfg, '--work-dir', str(work)], cwd=ROOT,
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = work / 'last_checkpoint'
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and 'iter_12' in last.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, 'training finished before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / 'iter_24.pth').exists()
    run_tool('train.py', cfg, '--work-dir', work, '--resume')
    a, b = _state(ref / 'iter_24.pth'), _state(work / 'iter_24.pth')
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff < 1e-5, diff
