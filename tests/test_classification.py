"""Classification pipeline tests (CPU): configs, bad inputs, aux loss, learning, validate, resume, NaN, DDP.

Every test makes its own tiny ImageFolder data (4 classes of coloured squares, 32 px) in a temp dir and runs
`test_overlock` through configs/cls/demo.yaml with overrides. Slow end-to-end runs are marked heavy.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification import train as train_mod
from classification import validate as validate_mod
from classification.common import create_model, load_model_weights
from classification.config import load_config

# the training data holds deliberately unreadable files; their warnings are expected
pytestmark = pytest.mark.filterwarnings('ignore:skipping unreadable image:RuntimeWarning')

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / 'configs/cls/demo.yaml')
COLORS = [(230, 40, 40), (40, 210, 40), (40, 40, 230), (230, 230, 40)]


def _make_split(root, n, rng, size=32):
    for c, color in enumerate(COLORS):
        d = root / f'class{c}'
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 90, (size, size, 3))
            s = int(rng.integers(size // 3, size // 2 + 1))
            x, y = rng.integers(0, size - s, 2)
            img[y:y + s, x:x + s] = np.clip(np.array(color) + rng.integers(-25, 25, 3), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(d / f'{i:03d}.png')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """In-process runs share 2 cores with the subprocess ones: one intra-op thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """train: 16/class (+ grayscale, RGBA, truncated and garbage files in class0), val: 8/class, val_tiny: 1/class."""
    root = tmp_path_factory.mktemp('cls_data')
    rng = np.random.default_rng(0)
    _make_split(root / 'train', 16, rng)
    _make_split(root / 'val', 8, rng)
    _make_split(root / 'val_tiny', 1, rng)  # for runs that only need an evaluation to happen
    c0 = root / 'train' / 'class0'
    Image.open(c0 / '000.png').convert('L').save(c0 / 'gray.png')
    Image.open(c0 / '001.png').convert('RGBA').save(c0 / 'rgba.png')
    good = (c0 / '002.png').read_bytes()
    (c0 / 'truncated.png').write_bytes(good[:len(good) // 2])
    (c0 / 'garbage.png').write_bytes(b'not an image at all' * 10)
    return root


QUICK = {'data.val_split': 'val_tiny', 'train.ema': 'false'}


def opts(data, **extra):
    """Small, fast settings on top of configs/cls/demo.yaml."""
    o = {'data.data_dir': str(data), 'data.img_size': 32, 'train.batch_size': 8, 'train.batch_size_per_gpu': 8,
         'train.log_interval': 1, 'train.epochs': 2, 'train.steps_per_epoch': None}
    o.update(extra)
    return [f'{k}={"null" if v is None else v}' for k, v in o.items()]


def env(**extra):
    e = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    e['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_cmd(work_dir, data, *args, **cfg):
    return [sys.executable, str(ROOT / 'classification/train.py'), DEMO, '--work-dir', str(work_dir), *args,
            '--cfg-options', *opts(data, **cfg)]


def read_log(work_dir):
    return [json.loads(line) for line in (Path(work_dir) / 'log.jsonl').read_text().splitlines()]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def load_ck(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same(a, b, path='ckpt'):
    """Exact, recursive equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


# ---------------------------------------------------------------- configs and bad inputs (fast, in-process)
def test_recipe_configs_and_overrides():
    for v, dp, cp in (('xt', 0.1, 0.925), ('t', 0.15, 0.95), ('s', 0.4, 0.95), ('b', 0.5, 0.975)):
        cfg = load_config(ROOT / f'configs/cls/overlock_{v}.yaml')
        assert cfg['model']['name'] == f'overlock_{v}' and cfg['model']['drop_path_rate'] == dp
        assert cfg['data']['crop_pct'] == cp and cfg['data']['interpolation'] == 'bicubic'
        t, a = cfg['train'], cfg['aug']
        assert (t['epochs'], t['warmup_epochs'], t['cooldown_epochs'], t['weight_decay']) == (300, 5, 10, 0.05)
        assert (t['min_lr'], t['warmup_lr'], t['clip_grad'], t['ema_decay']) == (1e-5, 1e-6, 5.0, 0.9999)
        assert (a['auto_augment'], a['mixup'], a['cutmix'], a['smoothing'], a['reprob']) == \
            ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
        assert cfg['model']['aux_weight'] == 0.4 and t['sync_bn'] and t['amp']
        assert train_mod.batch_plan(cfg, world=8) == (2048, 1, 2e-3)  # lr = 1e-3 * 2048 / 1024
        assert train_mod.batch_plan(cfg, world=2) == (2048, 4, 2e-3)  # same recipe on 2 GPUs: 4 micro-batches
    cfg = load_config(ROOT / 'configs/cls/overlock_t.yaml',
                      ['model.drop_path_rate=0.2', 'train.epochs=10', 'model.kwargs.use_context=false'])
    assert cfg['model']['drop_path_rate'] == 0.2 and cfg['train']['epochs'] == 10
    assert cfg['model']['kwargs'] == {'use_context': False}
    with pytest.raises(SystemExit, match="unknown config key 'train.epochz'"):
        load_config(ROOT / 'configs/cls/overlock_t.yaml', ['train.epochz=10'])


def test_bad_inputs_fail_early(data, tmp_path):
    wd = str(tmp_path / 'wd')
    cases = [
        (opts(tmp_path / 'nope'), 'dataset directory not found'),
        (opts(data, **{'model.name': 'overlock_q'}), "unknown model 'overlock_q'"),
        (opts(data, **{'train.nope': 1}), "unknown config key 'train.nope'"),
    ]
    for cfg_opts, msg in cases:
        with pytest.raises(SystemExit, match=msg) as e:
            train_mod.main([DEMO, '--work-dir', wd, '--cfg-options', *cfg_opts])
        assert '\n' not in str(e.value)
    assert not os.path.exists(wd)  # failed before any work
    # a checkpoint of another variant: validate, fine-tune init and resume all refuse it in one line
    other = tmp_path / 'xt.pth'
    torch.save({'state_dict': create_model(load_config(ROOT / 'configs/cls/overlock_xt.yaml',
                                                       ['data.num_classes=4']), aux_head=False).state_dict(),
                'arch': 'overlock_xt'}, other)
    with pytest.raises(SystemExit, match='cannot load') as e:
        validate_mod.main([DEMO, str(other), '--work-dir', wd, '--cfg-options', *opts(data)])
    assert '\n' not in str(e.value)
    with pytest.raises(SystemExit, match='cannot load'):
        train_mod.main([DEMO, '--work-dir', wd, '--cfg-options', *opts(data, **{'model.pretrained': other})])
    with pytest.raises(SystemExit, match="is for model 'overlock_xt'"):
        train_mod.main([DEMO, '--work-dir', wd, '--resume', str(other), '--cfg-options', *opts(data)])
    # as a process: exit code 1 and the message on stderr
    p = subprocess.run(train_cmd(wd, data, **{'train.epochz': 3}), capture_output=True, text=True, env=env())
    assert p.returncode == 1 and "unknown config key 'train.epochz'" in p.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- aux loss
def test_aux_loss_changes_overview_net_grads():
    """main + 0.4 * aux must send extra gradient into the Overview-Net (blocks4 / patch_embed4)."""
    cfg = load_config(DEMO, ['data.num_classes=4'])
    torch.manual_seed(0)
    model = create_model(cfg, aux_head=True).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    grads = {}
    for w in (0.4, 0.0):
        cfg['model']['aux_weight'] = w
        model.zero_grad()
        train_mod.build_criterion(cfg)(model(x), y).backward()
        grads[w] = {n: p.grad.clone() for n, p in model.named_parameters()
                    if n.startswith(('blocks4', 'patch_embed4')) and p.grad is not None}
    assert grads[0.4], 'no Overview-Net parameters found'
    assert any(not torch.allclose(grads[0.4][n], grads[0.0][n]) for n in grads[0.4])
    assert isinstance(model.eval()(x), torch.Tensor)  # aux head dropped at eval


# ---------------------------------------------------------------- determinism, NaN (in-process, short)
def test_fixed_seed_gives_identical_runs(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    res = []
    for i in range(2):
        wd = tmp_path / f'run{i}'
        train_mod.main([DEMO, '--work-dir', str(wd), '--cfg-options',
                        *opts(data, **QUICK, **{'train.epochs': 1, 'train.steps_per_epoch': 2})])
        first = next(line for line in (wd / 'train.log').read_text().splitlines() if '[1/2]' in line)
        res.append((first.split('loss ')[1].split()[0], read_log(wd)[0]['train_loss'],
                    json.loads((wd / 'results.json').read_text())['rank_state_sha256']))
    assert res[0] == res[1]
    assert torch.backends.cudnn.benchmark  # the authors' setting, on by default (train.cudnn_benchmark)


def test_nonfinite_loss_stops_or_skips(data, tmp_path, monkeypatch):
    monkeypatch.setenv('OVERLOCK_FAULT_NAN_STEP', '3')  # step 3 = second step of epoch 1
    wd = tmp_path / 'stop'
    with pytest.raises(SystemExit, match=r'non-finite loss \(nan\) at step 3') as e:
        train_mod.main([DEMO, '--work-dir', str(wd), '--cfg-options',
                        *opts(data, **QUICK, **{'train.steps_per_epoch': 2})])
    assert str(wd / 'checkpoint-last.pth') in str(e.value)
    ck = load_ck(wd / 'checkpoint-last.pth')
    assert ck['epoch'] == 0 and ck['step'] == 2
    assert all(torch.isfinite(v).all() for v in ck['state_dict'].values() if v.is_floating_point())
    wd = tmp_path / 'skip'
    train_mod.main([DEMO, '--work-dir', str(wd), '--cfg-options',
                    *opts(data, **QUICK, **{'train.steps_per_epoch': 2, 'train.skip_nonfinite': 'true'})])
    assert read_log(wd)[-1]['skipped_steps'] == 1
    ck = load_ck(wd / 'checkpoint-last.pth')
    assert ck['step'] == 4 and all(torch.isfinite(v).all() for v in ck['state_dict'].values() if v.is_floating_point())


# ---------------------------------------------------------------- end to end
@pytest.mark.heavy
def test_training_learns_and_validate_reproduces(data, tmp_path):
    wd = tmp_path / 'learn'
    p = subprocess.run(train_cmd(wd, data, **{'train.epochs': 8, 'train.log_interval': 4}),
                       capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = read_log(wd)
    assert len(log) == 8 and {'epoch', 'train_loss', 'top1', 'top5', 'ema_top1', 'ema_top5', 'lr'} <= log[-1].keys()
    assert log[-1]['top1'] >= 60, log  # chance is 25%
    assert log[0]['skipped_images'] >= 2 and 'truncated.png' in p.stderr and 'garbage.png' in p.stderr
    for f in ('config.yaml', 'checkpoint-last.pth', 'checkpoint-best.pth', 'checkpoint-best-ema.pth', 'results.json'):
        assert (wd / f).is_file(), f
    assert 'img_size: 32' in (wd / 'config.yaml').read_text()
    form = json.loads((wd / 'results.json').read_text())['form']  # model.accel: auto
    assert form == ('paper form' if torch.cuda.is_available() else 'accelerated (lean=True)')
    assert any((wd / 'tb').glob('events.out.tfevents.*'))
    assert 'img/s' in p.stdout and 'eta' in p.stdout
    # validate.py reproduces the logged accuracy of the last epoch, for the model and for the EMA
    out = validate_mod.main([DEMO, str(wd / 'checkpoint-last.pth'), '--work-dir', str(wd / 'eval'),
                             '--cfg-options', *opts(data)])
    assert out['top1'] == log[-1]['top1'] and out['top5'] == log[-1]['top5']
    assert json.loads((wd / 'eval/results.json').read_text())['top1'] == out['top1']
    out = validate_mod.main([DEMO, str(wd / 'checkpoint-last.pth'), '--use-ema', '--work-dir', str(wd / 'eval'),
                             '--cfg-options', *opts(data)])
    assert out['top1'] == log[-1]['ema_top1']
    out = validate_mod.main([DEMO, str(wd / 'checkpoint-last.pth'), '--reparam', '--work-dir', str(wd / 'eval'),
                             '--cfg-options', *opts(data)])
    assert abs(out['top1'] - log[-1]['top1']) <= 100 / 32 + 1e-6  # deploy form: same up to float noise
    # the authors' file layouts: plain state dict with `module.` prefix, and a state_dict_ema wrapper
    sd = load_ck(wd / 'checkpoint-last.pth')['state_dict']
    cfg = load_config(DEMO, opts(data))
    for i, obj in enumerate(({'module.' + k: v for k, v in sd.items()}, {'model': sd}, {'state_dict': sd})):
        torch.save(obj, tmp_path / f'authors{i}.pth')
        load_model_weights(create_model(cfg, aux_head=False), str(tmp_path / f'authors{i}.pth'))
    torch.save({'state_dict_ema': sd}, tmp_path / 'authors_ema.pth')
    load_model_weights(create_model(cfg, aux_head=False), str(tmp_path / 'authors_ema.pth'), use_ema=True)


@pytest.mark.heavy
def test_resume_after_sigkill_matches_uninterrupted(data, tmp_path):
    cfg = {'train.epochs': 3, 'train.steps_per_epoch': 4, 'data.val_split': 'val_tiny'}
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    p = subprocess.run(train_cmd(full, data, **cfg), capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # second run: SIGKILL in the middle of epoch 1, then --resume auto
    proc = subprocess.Popen(train_cmd(killed, data, **cfg), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env())
    for line in proc.stdout:
        if 'epoch 1/3 [2/4]' in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_ck(killed / 'checkpoint-last.pth')['epoch'] == 0
    p = subprocess.run(train_cmd(killed, data, '--resume', 'auto', **cfg), capture_output=True, text=True, env=env(),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'resumed from' in p.stdout
    a, b = load_ck(full / 'checkpoint-last.pth'), load_ck(killed / 'checkpoint-last.pth')
    for key in ('state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'epoch', 'step', 'best', 'metrics'):
        assert_same(a[key], b[key], key)
    assert read_log(full)[0] == read_log(killed)[0]  # same first-epoch loss in two independent processes


@pytest.mark.heavy
def test_ddp_two_ranks_hold_identical_weights(data, tmp_path):
    """2 gloo processes x 8 images x 2 accumulation steps = the configured global batch of 32."""
    wd = tmp_path / 'ddp'
    cmd = ['bash', str(ROOT / 'tools/dist_train.sh'), DEMO, '2', '--work-dir', str(wd), '--cfg-options',
           *opts(data, **QUICK, **{'train.epochs': 1, 'train.batch_size': 32, 'train.steps_per_epoch': 2})]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(PORT=free_port()), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((wd / 'results.json').read_text())
    assert res['world_size'] == 2 and res['steps'] == 2
    hashes = res['rank_state_sha256']
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert 'global batch 32 = 8 x 2 x 2 accumulation' in p.stdout  # DDP no_sync path exercised


def _children(pid):
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.heavy
def test_dead_rank_makes_the_other_exit(data, tmp_path):
    """Our own bound (process-group timeout / closed gloo connection) and torchrun's (it stops the other workers)."""
    port = free_port()
    procs = []
    for rank in range(2):
        e = env(MASTER_ADDR='127.0.0.1', MASTER_PORT=port, WORLD_SIZE=2, RANK=rank, LOCAL_RANK=rank,
                OVERLOCK_DIST_TIMEOUT=20)
        procs.append(subprocess.Popen(train_cmd(tmp_path / 'dead', data, **QUICK, **{'train.epochs': 50,
                                                                                   'train.batch_size': 16}),
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, text=True, env=e))
    try:
        for line in procs[0].stdout:
            if '[2/' in line:
                break
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0].wait(timeout=90)
        assert rc != 0 and time.time() - t0 < 90
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # through tools/dist_train.sh (torchrun): SIGKILL rank 1, torchrun ends rank 0 and exits non-zero
    cmd = ['bash', str(ROOT / 'tools/dist_train.sh'), DEMO, '2', '--work-dir', str(tmp_path / 'dead2'), '--cfg-options',
           *opts(data, **QUICK, **{'train.epochs': 50, 'train.batch_size': 16})]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env(PORT=free_port()))
    try:
        for line in run.stdout:
            if '[2/' in line:
                break
        envs = {w: dict(kv.split(b'=', 1) for kv in Path(f'/proc/{w}/environ').read_bytes().split(b'\0') if b'=' in kv)
                for w in _children(run.pid)}
        workers = {int(e[b'RANK']): w for w, e in envs.items() if b'RANK' in e}
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.time()
        assert run.wait(timeout=90) != 0 and time.time() - t0 < 90
        assert not Path(f'/proc/{workers[0]}').exists() or b'zombie' in Path(f'/proc/{workers[0]}/status').read_bytes()
    finally:
        if run.poll() is None:
            run.kill()
