"""Every checkpoint path is safe (issue 22) and its errors are short (issue 27, items 5, 9).

One test per defect found: a pickle payload through a URL, exception types that leaked
(ambiguous block detection, renamers indexing bad shapes, a non-finite 7x7 stem reaching
``lstsq``), silent corruption (flipped bytes, NaN / Inf), misleading messages (a look-alike
key, one extra key skipping a block), a partial ``tools/convert.py`` that exited 0, hundreds
of WARNING lines before a width error, and the converter's summaries. The payloads only
create a marker file (the ``payload`` fixture).
"""
import contextlib
import logging
import os

import pytest
import torch
from helpers import official_resnet_keys
from mmengine.logging import MMLogger

import mmreparam
from mmreparam.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    convert_checkpoint,
    detect_format,
    load_pretrained,
    safe_load,
)
from mmreparam.models import RepMLPResNet, ResNet
from mmreparam.testing import randomize_bn, randomize_parameters

SMALL = dict(depth=18, base_channels=8, stem_channels=32)


def small_model(reparam='OREPA', seed=0, **kwargs):
    torch.manual_seed(seed)
    model = ResNet(reparam=reparam, **dict(SMALL, **kwargs))
    randomize_bn(model, seed)
    return randomize_parameters(model, ['vector'], seed).eval()


def same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def log_records():
    """The records mmengine's current logger emits meanwhile (a list, filled in place)."""
    logger = MMLogger.get_current_instance()
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope='module')
def orepa_state():
    return small_model('OREPA', 1).state_dict()


# ------------------------------------------------------------------------------------------
# 1. URLs: downloaded, then read by the safe loader


def test_payload_marker_detects_unsafe_unpickling(tmp_path, payload):
    """The detector works: torch.load(weights_only=False) of the payload file creates the
    marker (what mmengine's URL loader did through torch.hub.load_state_dict_from_url)."""
    marker = tmp_path / 'ran'
    torch.save({'state_dict': {}, 'x': payload(marker)}, tmp_path / 'evil.pth')
    torch.load(tmp_path / 'evil.pth', weights_only=False)
    assert marker.exists()


def test_url_payload_never_runs(tmp_path, payload, http_root, hub_dir):
    from mmengine.runner.checkpoint import load_checkpoint
    root, base = http_root
    marker = tmp_path / 'ran'
    torch.save({'state_dict': {}, 'x': payload(marker)}, root / 'evil_url.pth')
    url = f'{base}/evil_url.pth'
    readers = [
        lambda: ResNet(reparam='OREPA', init_cfg=dict(type='Pretrained', checkpoint=url),
                       **SMALL).init_weights(),
        lambda: convert_checkpoint(ResNet(reparam='OREPA', **SMALL), url),
        lambda: mmreparam.expand(ResNet(reparam='OREPA', **SMALL), url),
        # load_from / --resume / tools/test.py CKPT and mmengine's own Pretrained init
        lambda: load_checkpoint(torch.nn.Conv2d(1, 1, 1), url, map_location='cpu'),
    ]
    for read in readers:
        with pytest.raises(UnsafeCheckpointError, match='evil_url.pth'):
            read()
        assert not marker.exists()
        assert not list((hub_dir / 'checkpoints').iterdir())  # refused: not kept in the cache


def test_url_is_cached_in_torch_hub_and_logged(tmp_path, http_root, hub_dir):
    root, base = http_root
    source = small_model('OREPA', 2)
    torch.save({'state_dict': source.state_dict()}, root / 'good_url.pth')
    model = small_model('OREPA', 3)
    with log_records() as records:
        load_pretrained(model, f'{base}/good_url.pth')
    cached = hub_dir / 'checkpoints' / 'good_url.pth'
    assert cached.exists() and same_state(model.state_dict(), source.state_dict())
    assert f'downloading {base}/good_url.pth to {cached}' in [r.getMessage() for r in records]
    (root / 'good_url.pth').unlink()  # read again from the cache, not the server
    again = small_model('OREPA', 4)
    load_pretrained(again, f'{base}/good_url.pth')
    assert same_state(again.state_dict(), source.state_dict())


def test_model_zoo_names_go_through_the_safe_loader(tmp_path, payload, http_root, hub_dir,
                                                    monkeypatch):
    """``torchvision://`` / ``open-mmlab://`` names resolve to URLs as mmengine resolves
    them, and are downloaded and read by the safe loader."""
    from mmengine.runner import checkpoint as mm
    root, base = http_root
    marker = tmp_path / 'ran'
    torch.save({'x': payload(marker)}, root / 'zoo_evil.pth')
    monkeypatch.setattr(mm, 'get_torchvision_models', lambda: {'r18': f'{base}/zoo_evil.pth'})
    monkeypatch.setattr(mm, 'get_external_models', lambda: {'r18': f'{base}/zoo_evil.pth'})
    for name in ('torchvision://r18', 'open-mmlab://r18'):
        with pytest.raises(UnsafeCheckpointError):
            convert_checkpoint(ResNet(reparam='OREPA', **SMALL), name)
        with pytest.raises(UnsafeCheckpointError):
            mm.load_checkpoint(torch.nn.Conv2d(1, 1, 1), name)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no torchvision:// checkpoint called 'r50'"):
        convert_checkpoint(ResNet(reparam='OREPA', **SMALL), 'torchvision://r50')


def test_file_backend_paths_go_through_the_safe_loader(tmp_path, payload, monkeypatch):
    """``s3://`` / ``petrel://`` paths (mmengine's ``load_from_ceph``: a plain ``torch.load``,
    ``weights_only=False`` before torch 2.6) are read through mmengine's file backend and
    unpickled by the safe loader, on every entry point. The backend here serves local
    files (no petrel client in the tests)."""
    import mmengine.fileio
    from mmengine.runner import checkpoint as mm
    marker = tmp_path / 'ran'
    torch.save({'state_dict': {}, 'x': payload(marker)}, tmp_path / 'evil.pth')
    source = small_model('OREPA', 2)
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'good.pth')

    class LocalBackend:
        def get(self, path):
            return (tmp_path / path.rsplit('/', 1)[1]).read_bytes()

    monkeypatch.setattr(mmengine.fileio, 'get_file_backend', lambda path: LocalBackend())
    for path in ('s3://bucket/evil.pth', 'cluster1:s3://bucket/evil.pth',
                 'petrel://bucket/evil.pth'):
        assert mm.CheckpointLoader._get_checkpoint_loader(path).__name__ == \
            'load_from_mmreparam_safe'
        with pytest.raises(UnsafeCheckpointError):
            mm.load_checkpoint(torch.nn.Conv2d(1, 1, 1), path)
        with pytest.raises(UnsafeCheckpointError):
            convert_checkpoint(ResNet(reparam='OREPA', **SMALL), path)
    assert not marker.exists()
    model = small_model('OREPA', 3)
    mm.load_checkpoint(model, 's3://bucket/good.pth', map_location='cpu')
    assert same_state(model.state_dict(), source.state_dict())


def test_download_failure_is_one_checkpoint_error(http_root, hub_dir):
    _, base = http_root
    with pytest.raises(CheckpointError, match='cannot download checkpoint .*missing.pth'):
        convert_checkpoint(ResNet(reparam='OREPA', **SMALL), f'{base}/missing.pth')
    assert not list((hub_dir / 'checkpoints').iterdir())


# ------------------------------------------------------------------------------------------
# 2. One exception type, naming the block and keys


def test_ambiguous_block_names_the_block_and_keys(orepa_state):
    state = dict(orepa_state)
    state['layer1.0.conv1.dbb_origin.conv.weight'] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(ResNet(reparam='OREPA', **SMALL), state)
    message = str(err.value)
    assert "block 'layer1.0.conv1'" in message and '\n' not in message
    assert 'layer1.0.conv1.dbb_origin.conv.weight' in message
    assert 'layer1.0.conv1.weight_orepa_origin' in message


@pytest.mark.parametrize('shape', [(8, ), ()])
def test_official_gconv_pw_of_a_wrong_shape_is_a_checkpoint_error(orepa_state, shape):
    state = official_resnet_keys(orepa_state)
    key = 'stage1.0.conv1.weight_orepa_gconv_pw'
    assert key in state and detect_format(state).name == 'official_resnet'
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match='weight_orepa_gconv_pw: expected a 1x1 kernel'):
        convert_checkpoint(ResNet(reparam='OREPA', **SMALL), state)


def test_official_orepa_vgg_vector_of_a_wrong_shape_is_a_checkpoint_error():
    from mmreparam.models import RepVGG
    model = RepVGG('A0', reparam='OREPA_VGG', base_channels=8)
    state = {k.replace('stem.', 'stage0.', 1).replace('stage_', 'stage').replace(
        'weight_orepa_', 'weight_rbr_'): v for k, v in model.state_dict().items()}
    assert detect_format(state).name == 'official_repvgg'
    state['stage0.rbr_dense.vector'] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match=r"rbr_dense.vector: expected OREPA-VGG's branch"):
        convert_checkpoint(model, state)


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_nonfinite_7x7_stem_never_reaches_the_factorization(value, capfd):
    """A plain ResNet's 7x7 stem into OREPA is factored by lstsq: a NaN asserted inside it
    (and oneMKL printed to stdout), an Inf bypassed the residual check and loaded."""
    from mmreparam.models.layers.fuse import factor_into_3x3
    plain = {'conv1.weight': torch.randn(32, 3, 7, 7), 'bn1.weight': torch.ones(32),
             'bn1.bias': torch.zeros(32), 'bn1.running_mean': torch.zeros(32),
             'bn1.running_var': torch.ones(32)}
    plain['conv1.weight'][0, 0, 0, 0] = value
    model = ResNet(reparam='OREPA', **SMALL)
    with pytest.raises(CheckpointError, match='conv1.weight'):  # refused by default
        convert_checkpoint(model, plain)
    with pytest.raises(CheckpointError, match='NaN or Inf'):
        convert_checkpoint(model, plain, allow_nonfinite=True)
    from mmreparam.errors import ExpansionError
    with pytest.raises(ExpansionError, match='NaN or Inf'):
        factor_into_3x3(plain['conv1.weight'].double(), 3, 32)
    assert 'MKL' not in capfd.readouterr().out


# ------------------------------------------------------------------------------------------
# 3. Corruption and non-finite values


def test_flipped_byte_in_a_tensor_is_detected(tmp_path, orepa_state):
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': orepa_state}, path)
    data = bytearray(path.read_bytes())
    target = orepa_state['layer2.0.conv2.weight_orepa_origin']
    offset = data.find(target.numpy().tobytes()[:64])
    assert offset > 0
    data[offset + 5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted: the data of '.*' does not match its "
                       'CRC-32'):
        safe_load(path)
    with pytest.raises(CheckpointError, match='ckpt.pth'):
        load_pretrained(ResNet(reparam='OREPA', **SMALL), path)
    assert safe_load(path, verify_crc=False)  # the bug: torch alone loads it silently


def test_nonfinite_values_are_refused_by_default(tmp_path, orepa_state):
    state = dict(orepa_state)
    state['layer1.1.conv2.bn.running_var'] = state['layer1.1.conv2.bn.running_var'].clone()
    state['layer1.1.conv2.bn.running_var'][3] = float('nan')
    state['layer3.0.conv1.weight_orepa_origin'] = state[
        'layer3.0.conv1.weight_orepa_origin'].clone().fill_(float('inf'))
    torch.save(state, tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError, match=r"'.*nan.pth' has NaN or Inf values in 2 "
                       r'tensor\(s\): layer1.1.conv2.bn.running_var, '
                       'layer3.0.conv1.weight_orepa_origin'):
        ResNet(reparam='OREPA', init_cfg=dict(type='Pretrained',
                                              checkpoint=str(tmp_path / 'nan.pth')),
               **SMALL).init_weights()
    model = ResNet(reparam='OREPA', init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'nan.pth'), allow_nonfinite=True), **SMALL)
    model.init_weights()  # the explicit opt-out
    assert torch.isnan(model.state_dict()['layer1.1.conv2.bn.running_var'][3])


# ------------------------------------------------------------------------------------------
# 4. Misleading messages; partial conversions


@pytest.mark.parametrize('lookalike', ['conv1.weight', 'stage0.conv1.weight'])
def test_one_lookalike_key_does_not_switch_the_format(orepa_state, lookalike):
    state = dict(orepa_state, **{lookalike: torch.zeros(8, 3, 7, 7)})
    model = ResNet(reparam='OREPA', **SMALL)
    assert detect_format(state).name == 'mmreparam'
    report = load_pretrained(model, state)
    assert report.unexpected == [lookalike] and not report.missing
    assert same_state(model.state_dict(), orepa_state)


def test_one_extra_key_in_a_block_does_not_skip_it(orepa_state):
    state = dict(orepa_state, **{'layer1.0.conv1.stray': torch.zeros(3)})
    model = ResNet(reparam='OREPA', **SMALL)
    report = load_pretrained(model, state)
    assert report.unexpected == ['layer1.0.conv1.stray']
    assert not report.missing and not report.mismatched
    assert same_state(model.state_dict(), orepa_state)


def test_convert_tool_refuses_a_partial_conversion(orepa_state, tmp_path, load_tool, capsys):
    tool = load_tool('convert')
    state = {k: v for k, v in orepa_state.items() if not k.startswith('layer2.1.conv1.')}
    state['layer1.0.conv1.stray'] = torch.zeros(3)
    torch.save(state, tmp_path / 'partial.pth')
    dst = tmp_path / 'out.pth'
    args = [str(tmp_path / 'partial.pth'), str(dst), '--arch', 'ResNet-18', '--set',
            'base_channels=8', 'stem_channels=32']
    assert tool.main(args) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and 'partial conversion' in errors[0]
    assert 'missing (e.g. layer2.1.conv1.' in errors[0]
    assert '1 unused (e.g. layer1.0.conv1.stray)' in errors[0]
    assert not dst.exists() and os.listdir(tmp_path) == ['partial.pth']
    assert tool.main(args + ['--allow-partial']) == 0
    assert dst.exists() and 'missing: layer2.1.conv1.' in capsys.readouterr().out


def test_width_mismatch_is_one_summary_and_named(tmp_path, load_tool, capsys):
    """A half-width checkpoint: a few WARNING lines (not one per key) and an error that
    names the ratio and the base_channels to set (issue 27, item 5)."""
    half = ResNet(reparam='OREPA', depth=18, base_channels=16)
    torch.save(half.state_dict(), tmp_path / 'half.pth')
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with log_records() as records, pytest.raises(CheckpointError) as err:
            load_pretrained(ResNet(reparam='OREPA', depth=18, base_channels=32),
                            tmp_path / 'half.pth')
    finally:
        logger.setLevel(level)
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]
    assert len([r for r in records if r.levelno == logging.DEBUG]) > 50  # every key
    assert "0.5x the model's" in str(err.value) and 'base_channels=16' in str(err.value)

    tool = load_tool('convert')
    assert tool.main([str(tmp_path / 'half.pth'), str(tmp_path / 'out.pth'), '--arch',
                      'ResNet-18', '--reparam', 'OREPA', '--set', 'base_channels=32']) == 1
    captured = capsys.readouterr()
    assert '--set base_channels=16' in captured.err
    assert captured.out.count('WARNING') <= 3


def test_convert_tool_deploy_counts_folded_repmlp_units(tmp_path, load_tool, capsys):
    """``tools/convert.py --deploy`` of a train RepMLP checkpoint folds after loading: the
    summary counts those folds (it said "0 block(s) folded or expanded")."""
    model = RepMLPResNet('light', base_channels=8, img_size=112).eval()
    torch.save(model.state_dict(), tmp_path / 'repmlp.pth')
    tool = load_tool('convert')
    assert tool.main([str(tmp_path / 'repmlp.pth'), str(tmp_path / 'out.pth'), '--arch',
                      'RepMLP-Res50-light', '--deploy', '--reparam', 'base', '--set',
                      'base_channels=8', 'img_size=112']) == 0
    out = capsys.readouterr().out
    foldable = [name for name, m in model.named_modules() if getattr(m, 'folded', True) is False]
    outermost = [n for n in foldable if not any(n.startswith(o + '.') for o in foldable)]
    assert any('repmlp' in n for n in outermost)
    assert f'{len(outermost)} block(s) folded or expanded' in out, out


def test_expand_summary_names_the_ignored_keys(caplog):
    source = small_model('base', 5)
    state = dict(source.state_dict(), **{'fc.weight': torch.zeros(4, 8), 'fc.bias':
                                        torch.zeros(4)})
    state = {k.replace('stem.conv.', 'conv1.').replace('stem.bn.', 'bn1.'): v
             for k, v in state.items()}
    plain = {}
    for key, value in state.items():  # the plain (torchvision) names of a base ResNet
        for part in ('conv1', 'conv2'):
            n = part[-1]
            key = key.replace(f'.{part}.conv.', f'.conv{n}.').replace(f'.{part}.bn.', f'.bn{n}.')
        plain[key.replace('downsample.0.conv.', 'downsample.0.').replace(
            'downsample.0.bn.', 'downsample.1.')] = value
    model = ResNet(reparam='OREPA', **SMALL)
    report = mmreparam.expand(model, plain, strict=False)
    assert report.ignored == ['fc.weight', 'fc.bias']
    assert '2 ignored (fc.weight, fc.bias)' in report.summary()
