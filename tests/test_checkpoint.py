"""Checkpoint loading: the authors' layouts, deploy conversion, safety and clear errors."""
import os
import pickle

import pytest
import timm
import torch

from overlock_core.checkpoint import CheckpointError, load_checkpoint_file, load_weights, save_atomic
from overlock_core.models import OverLoCK


@pytest.fixture(scope='module')
def trained():
    torch.manual_seed(1)
    m = OverLoCK('test', num_classes=10, aux_head=True)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize('layout', ['plain', 'state_dict', 'ema', 'model', 'module'])
def test_release_layouts_load_through_timm(tmp_path, trained, layout):
    sd = trained.state_dict()
    obj = {'plain': sd, 'state_dict': {'state_dict': sd, 'epoch': 3}, 'ema': {'state_dict': {}, 'state_dict_ema': sd},
           'model': {'model': sd}, 'module': {'state_dict': {'module.' + k: v for k, v in sd.items()}}}[layout]
    path = tmp_path / 'overlock_test_in1k_224.pth'
    torch.save(obj, path)
    m = timm.create_model('test_overlock', pretrained=True, num_classes=10, aux_head=True,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), trained(x))


def test_pretrained_without_file_is_a_clear_error():
    with pytest.raises(ValueError, match='pretrained_cfg_overlay'):
        timm.create_model('test_overlock', pretrained=True)


def test_new_classifier_and_aux_dropped(tmp_path, trained):
    path = tmp_path / 'ck.pth'
    torch.save(trained.state_dict(), path)
    m = timm.create_model('test_overlock', pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m.patch_embed1[0].weight, trained.patch_embed1[0].weight)
    assert m.aux_head is None and m.get_classifier().out_channels == 3


def test_training_checkpoint_into_deploy_model(trained):
    dep = OverLoCK('test', num_classes=10, deploy=True).eval()
    load_weights(dep, trained.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), trained(x), rtol=1e-4, atol=1e-4)


def test_reparam_file_needs_deploy_model(tmp_path, trained):
    import copy
    dep = copy.deepcopy(trained).reparameterize()
    path = tmp_path / 'overlock_test_in1k_224_reparam.pth'
    torch.save(dep.state_dict(), path)
    with pytest.raises(CheckpointError, match='deploy=True'):
        load_weights(OverLoCK('test', num_classes=10, aux_head=True), path)
    fresh = OverLoCK('test', num_classes=10, aux_head=True, deploy=True).eval()
    load_weights(fresh, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=1e-4, atol=1e-4)


def test_dense_model_from_imagenet_checkpoint(trained):
    det = OverLoCK('test', dense='det')
    report = load_weights(det, trained.state_dict(), allow_missing=(r'^extra_norm\.', r'^h_proj\.'))
    assert report['missing'] and all(k.startswith(('extra_norm.', 'h_proj.')) for k in report['missing'])
    with pytest.raises(CheckpointError, match='missing'):
        load_weights(det, trained.state_dict())
    # a detector checkpoint (backbone. prefix, mmengine layout) into a segmentation backbone
    sd = {'state_dict': {'backbone.' + k: v for k, v in det.state_dict().items()} | {'neck.w': torch.zeros(1)}}
    load_weights(OverLoCK('test', dense='seg'), sd)


def test_checkpoint_of_another_variant_is_refused():
    other = OverLoCK('test', num_classes=10, dims=(16, 32, 64, 128))
    with pytest.raises(CheckpointError, match=r'mis-shaped.*another variant'):
        load_weights(OverLoCK('test', num_classes=10), other.state_dict())


def test_missing_corrupt_and_unsafe_files(tmp_path, trained):
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    good = tmp_path / 'good.pth'
    torch.save(trained.state_dict(), good)
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint_file(bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': trained.state_dict(), 'x': Evil()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match='refusing to load'):
        load_checkpoint_file(evil)
    assert not (tmp_path / 'pwned').exists()


def test_safetensors_and_atomic_save(tmp_path, trained):
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    m = OverLoCK('test', num_classes=10, aux_head=True)
    load_weights(m, path)
    torch.testing.assert_close(m.state_dict()['head.4.weight'], trained.state_dict()['head.4.weight'])
    target = tmp_path / 'sub' / 'last.pth'
    save_atomic({'a': torch.ones(2)}, target)
    save_atomic({'a': torch.zeros(2)}, target)
    assert torch.load(target)['a'].sum() == 0
    assert os.listdir(target.parent) == ['last.pth']


def test_convert_checkpoint_tool(tmp_path, trained):
    import subprocess
    import sys
    src = tmp_path / 'overlock_test_in1k.pth'
    torch.save({'state_dict_ema': trained.state_dict(), 'state_dict': trained.state_dict()}, src)
    res = subprocess.run([sys.executable, 'tools/convert_checkpoint.py', str(src), '--variant', 'test', '--reparam',
                          '--safetensors'], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    dep = OverLoCK('test', num_classes=10, aux_head=True, deploy=True).eval()
    load_weights(dep, tmp_path / 'overlock_test_in1k_reparam.safetensors')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), trained(x), rtol=1e-4, atol=1e-4)
    bad = subprocess.run([sys.executable, 'tools/convert_checkpoint.py', str(src), '--variant', 't'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and 'does not fit' in bad.stderr


def test_mmengine_runner_checkpoint_loads_without_changing_torch(tmp_path, trained):
    """A Runner checkpoint (message hub with HistoryBuffers) loads through load_checkpoint_file in any process,
    allowed for that load only: torch's process-wide allow-list is the same afterwards."""
    pytest.importorskip('mmengine')
    from mmengine.logging import HistoryBuffer
    path = tmp_path / 'epoch_1.pth'
    buf = HistoryBuffer()
    buf.update(1.5)
    torch.save({'state_dict': {'backbone.' + k: v for k, v in trained.state_dict().items()},
                'message_hub': {'log_scalars': {'train/loss': buf}}}, path)
    before = list(torch.serialization.get_safe_globals())
    obj = load_checkpoint_file(path)
    assert isinstance(obj['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    added = [g for g in torch.serialization.get_safe_globals() if g not in before]
    assert all(getattr(g, '__module__', '').startswith('torch') for g in added)  # torch adds its own lazily
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # outside the loader nothing was allowed
