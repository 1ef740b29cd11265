"""Property-based fuzz of every checkpoint reader (issue 22).

Seeded (``derandomize=True``): each run draws the same few hundred mutated checkpoints of
small models (mmreparam's own OREPA ResNet, its official OREPA_CVPR2022 and plain
torchvision layouts, a whole mmpretrain classifier written by mmengine, a RepOpt scales
file) and reads each through one entry point: ``init_cfg=Pretrained``, the converter API,
``tools/convert.py``, ``tools/fold.py``, ``mmreparam.expand``, the RepOpt scales loader and
mmengine's ``load_checkpoint`` (``load_from``, ``--resume``, ``tools/test.py CKPT``), from a
local file or from ``http.server`` on 127.0.0.1. The mutations: pickle payloads (they only
create a marker file), flipped bytes, truncation, garbage, NaN / Inf, wrong shapes and
dtypes, dropped, renamed, extra and look-alike keys, keys of another block type, values
that are not tensors.

Each read must end in exactly one of two ways: one :class:`CheckpointError` (a tool: exit
status 1 and one ``error:`` line), or a load whose every difference from the clean load is
reported (``missing`` in the converter's report; tools and ``expand`` write or load only an
exact result). Never: a payload that ran, another exception type, a file left behind.
"""
import shutil

import numpy as np
import pytest
import torch
from helpers import official_resnet_keys
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mmengine.logging.history_buffer import HistoryBuffer

import mmreparam
from mmreparam.checkpoint import CheckpointError, convert_checkpoint, safe_load

BACKBONE = dict(depth=18, base_channels=4, stem_channels=32)
BYTE_MUTATIONS = ('flip', 'truncate', 'garbage')
MUTATIONS = ('none', 'payload_top', 'payload_value', 'nonfinite', 'reshape', 'dtype', 'drop',
             'extra', 'rename', 'lookalike', 'other_block', 'not_a_tensor', *BYTE_MUTATIONS)
# The entry points, the layouts each reads, and whether it reads URLs.
ENTRIES = {
    'pretrained': (('own', 'official', 'plain', 'classifier'), True),
    'converter': (('own', 'official', 'plain'), True),
    'convert_tool': (('own', 'official', 'plain'), True),
    'expand': (('own', 'plain'), True),
    'fold_tool': (('classifier', ), False),
    'scales': (('scales', ), False),
    'mmengine': (('own', 'classifier'), True),
}
# Each entry point as often as the others; then one of its layouts, a file or a URL.
CASES = st.sampled_from(sorted(ENTRIES)).flatmap(lambda entry: st.tuples(
    st.just(entry), st.sampled_from(ENTRIES[entry][0]),
    st.booleans() if ENTRIES[entry][1] else st.just(False)))
CONFIG = '''
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='mmreparam.ResNet', depth=18, reparam='OREPA', base_channels=4,
                  stem_channels=32),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=3, in_channels=32,
              loss=dict(type='CrossEntropyLoss')))
'''


def backbone(reparam='OREPA', seed=0):
    torch.manual_seed(seed)
    return mmreparam.ResNet(reparam=reparam, **BACKBONE)


def comparable(state):
    """The values a load must reproduce (``num_batches_tracked`` is not one)."""
    return {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}


def differing(state, reference):
    state, reference = comparable(state), comparable(reference)
    assert set(state) == set(reference)
    return [k for k in reference if not torch.equal(state[k], reference[k])]


def to_plain(state):
    """A ``reparam='base'`` state in torchvision's names."""
    out = {}
    for key, value in state.items():
        key = key.replace('stem.conv.', 'conv1.').replace('stem.bn.', 'bn1.')
        for n in '123':
            key = key.replace(f'.conv{n}.conv.', f'.conv{n}.').replace(f'.conv{n}.bn.', f'.bn{n}.')
        out[key.replace('downsample.0.conv.', 'downsample.0.').replace(
            'downsample.0.bn.', 'downsample.1.')] = value
    out['fc.weight'], out['fc.bias'] = torch.zeros(10, 32), torch.zeros(10)
    return out


class Sources:
    """The clean checkpoints (as objects) and the clean result of every case."""

    def __init__(self, root, load_tool):
        from mmreparam.testing import randomize_bn, randomize_parameters
        self.root = root
        self.convert = load_tool('convert')
        self.fold = load_tool('fold')
        own = randomize_parameters(randomize_bn(backbone('OREPA', 1), 1), ['vector'], 1)
        plain = randomize_bn(backbone('base', 2), 2)
        self.config = root / 'config.py'
        self.config.write_text(CONFIG)
        from mmreparam.cli.model import build_model, load_config
        torch.manual_seed(3)
        classifier = randomize_bn(build_model(load_config(str(self.config))), 3)
        history = HistoryBuffer()
        history.update(1.0)
        scales = {name: {'conv': torch.rand(8) + 0.5, 'conv_1x1': torch.rand(8) + 0.5}
                  for name in ('stem', 'stage_1.0', 'stage_1.1')}
        self.objects = {
            'own': {'state_dict': own.state_dict(), 'meta': {'epoch': 3}},
            'official': official_resnet_keys(own.state_dict()),
            'plain': to_plain(plain.state_dict()),
            'classifier': {'state_dict': classifier.state_dict(),
                           'meta': {'seed': np.int64(3)},
                           'message_hub': {'log_scalars': {'loss': history}}},
            'scales': {'scales': scales, 'meta': {'format': 'mmreparam.repopt_scales'}},
        }
        self.references = {}
        self.cases = 0

    def reference(self, entry, layout, read):
        if (entry, layout) not in self.references:
            path = self.root / f'clean_{entry}_{layout}.pth'
            torch.save(self.objects[layout], path)
            out = self.root / f'clean_{entry}_{layout}'
            out.mkdir()
            self.references[entry, layout] = read(str(path), out)
        return self.references[entry, layout]


@pytest.fixture(scope='module')
def sources(tmp_path_factory, load_tool):
    root = tmp_path_factory.mktemp('fuzz')
    hub = root / 'hub'
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    yield Sources(root, load_tool)
    torch.set_num_threads(threads)
    torch.hub.set_dir(previous)


def tensor_keys(state):
    return sorted(k for k, v in state.items()
                  if isinstance(v, torch.Tensor) and not k.endswith('num_batches_tracked'))


def state_of(obj):
    """The dict holding the tensors of a checkpoint object (mutated in place)."""
    if 'state_dict' in obj:
        return obj['state_dict']
    if 'scales' in obj:
        return obj['scales'][sorted(obj['scales'])[int(obj.get('_pick', 0))]]
    return obj


def mutate_object(obj, mutation, data, marker):
    """Apply an object-level mutation; return the key it added or changed (or None)."""
    if mutation == 'payload_top':
        obj['evil'] = data['payload'](marker)
        return None
    state = state_of(obj)
    keys = tensor_keys(state)
    key = keys[data['index'] % len(keys)]
    value = state[key]
    if mutation == 'payload_value':
        state[key] = data['payload'](marker)
    elif mutation == 'nonfinite' and value.is_floating_point():
        value = value.clone()
        value.view(-1)[data['index'] % value.numel()] = data['special']
        state[key] = value
    elif mutation == 'reshape':
        state[key] = {
            'scalar': value.flatten()[0].clone(),
            'flat': value.flatten().clone(),
            'double': torch.cat([value, value]),
            'drop_dim': value[..., 0].clone() if value.dim() else value.reshape(1),
        }[data['shape']]
    elif mutation == 'dtype':
        state[key] = value.to(data['dtype'])
    elif mutation == 'drop':
        del state[key]
    elif mutation == 'extra':
        key = key.rsplit('.', 1)[0] + '.stray'
        state[key] = torch.zeros(3)
    elif mutation == 'rename':
        state[key + '_renamed'] = state.pop(key)
        key += '_renamed'
    elif mutation == 'lookalike':
        key = data['lookalike']
        state[key] = torch.zeros(4, 3, 7, 7)
    elif mutation == 'other_block':
        block = key.rsplit('.', 2)[0] if '.conv' in key else key.rsplit('.', 1)[0]
        key = block + '.dbb_origin.conv.weight'
        state[key] = torch.zeros(4, 4, 3, 3)
    elif mutation == 'not_a_tensor':
        state[key] = data['not_a_tensor']
    changed = state.get(key)
    if isinstance(changed, torch.Tensor) and changed.dtype == value.dtype and torch.equal(
            changed, value):
        return None  # e.g. a 1-d tensor flattened: nothing changed
    return key


def mutate_bytes(path, mutation, data):
    raw = bytearray(path.read_bytes())
    if mutation == 'flip':
        raw[data['index'] % len(raw)] ^= data['mask']
    elif mutation == 'truncate':
        raw = raw[:data['index'] % len(raw)]
    else:
        raw = bytearray(np.random.default_rng(data['index']).bytes(max(1, len(raw) // 50)))
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------
# The entry points: ``read(source, out_dir)`` returns what must match the clean read
# (raising CheckpointError, or a tool's SystemExit-like failure, otherwise).


class ToolFailed(Exception):
    """A tool exited with 1; holds its stderr."""


def read_pretrained(sources, src, out):
    torch.manual_seed(0)  # expansion keeps the model's values in the switched-off branches
    model = mmreparam.ResNet(reparam='OREPA', init_cfg=dict(type='Pretrained', checkpoint=src),
                             **BACKBONE)
    model.init_weights()
    # Pretrained logs its report; the same conversion gives it to the test.
    return model.state_dict(), convert_checkpoint(backbone(), src)[1]


def read_converter(sources, src, out):
    model = backbone()
    state, report = convert_checkpoint(model, src)
    model.load_state_dict(state, strict=False)
    return model.state_dict(), report


def read_expand(sources, src, out):
    model = backbone()
    mmreparam.expand(model, src)
    return model.state_dict(), None


def run_tool(main, argv, capsys):
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    if status:
        assert status == 1 and len(err) == 1 and 'error: ' in err[0], err
        raise ToolFailed(err[0])


def read_convert_tool(sources, src, out, capsys):
    dst = out / 'dst.pth'
    torch.manual_seed(0)  # expansion keeps the model's values in the switched-off branches
    run_tool(sources.convert.main, [src, str(dst), '--arch', 'ResNet-18', '--reparam', 'OREPA',
                                    '--set', 'base_channels=4', 'stem_channels=32'], capsys)
    return torch.load(dst, weights_only=True)['state_dict'], None


def read_fold_tool(sources, src, out, capsys):
    run_tool(sources.fold.main, [str(sources.config), src, str(out / 'deploy'), '--shape', '32',
                                 '32'], capsys)
    return torch.load(out / 'deploy' / 'deploy.pth', weights_only=True)['state_dict'], None


def read_scales(sources, src, out):
    from mmreparam.engine.optimizers.repopt_scales_io import load_scales
    scales = load_scales(src)
    return {f'{b}.{k}': v for b, entry in scales.items() for k, v in entry.items()}, None


def read_mmengine(sources, src, out):
    from mmengine.runner.checkpoint import load_checkpoint
    model = backbone()
    load_checkpoint(model, src, map_location='cpu', revise_keys=[(r'^backbone\.', '')])
    return model.state_dict(), None


READERS = dict(pretrained=read_pretrained, converter=read_converter, expand=read_expand,
               convert_tool=read_convert_tool, fold_tool=read_fold_tool, scales=read_scales,
               mmengine=read_mmengine)
TOOLS = ('convert_tool', 'fold_tool')


mutation_data = st.fixed_dictionaries({
    'index': st.integers(0, 2**31 - 1),
    'mask': st.integers(1, 255),
    'special': st.sampled_from([float('nan'), float('inf'), float('-inf')]),
    'shape': st.sampled_from(['scalar', 'flat', 'double', 'drop_dim']),
    'dtype': st.sampled_from([torch.int64, torch.bool, torch.float64, torch.uint8]),
    'lookalike': st.sampled_from(['conv1.weight', 'stage0.conv1.weight',
                                  'layer1.0.conv1.weight', 'stem.branch_3x3.conv.weight']),
    'not_a_tensor': st.sampled_from(['text', [1, 2], None, 3.5]),
    'pick': st.integers(0, 2),
})


@settings(max_examples=300, derandomize=True, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=CASES, mutation=st.sampled_from(MUTATIONS), data=mutation_data)
def test_every_reader_fails_cleanly_or_loads_exactly(sources, http_root, payload, capsys, case,
                                                     mutation, data):
    entry, layout, url = case
    served, base = http_root
    read = READERS[entry]
    if entry in TOOLS:
        read = (lambda r: lambda s, src, out: r(s, src, out, capsys))(read)
    reference, _ = sources.reference(entry, layout, lambda src, out: read(sources, src, out))

    sources.cases += 1
    work = sources.root / f'case_{sources.cases}'
    work.mkdir()
    marker = work / 'payload_ran'
    obj = torch.load(sources.root / f'clean_{entry}_{layout}.pth', weights_only=False)
    if layout == 'scales':
        obj['_pick'] = data['pick']
    data = dict(data, payload=payload)
    mutated = None if mutation in BYTE_MUTATIONS else mutate_object(obj, mutation, data, marker)
    obj.pop('_pick', None)
    name = f'{work.name}.pth'
    path = (served if url else work) / name
    torch.save(obj, path)
    if mutation in BYTE_MUTATIONS:
        mutate_bytes(path, mutation, data)
    src = f'{base}/{name}' if url else str(path)
    out = work / 'out'
    out.mkdir()
    cache = sources.root / 'hub' / 'checkpoints'
    try:
        result, report = read(sources, src, out)
    except (CheckpointError, ToolFailed) as err:
        event(f'{entry}: refused')
        message = str(err)
        assert '\n' not in message
        if entry in ('pretrained', 'converter', 'expand'):
            assert name in message, message  # names the checkpoint
        assert not [f for f in out.rglob('*') if f.is_file()], 'a file was left'
        if (cache / name).exists():  # kept only if complete and readable (content refused)
            assert (cache / name).read_bytes() == path.read_bytes()
            safe_load(cache / name)
    else:
        diff = differing(result, reference)
        event(f'{entry}: loaded ' + ('exactly' if not diff else 'partly, reported'))
        if entry in ('pretrained', 'converter'):  # partial loads are reported, key by key
            assert set(diff) <= set(report.missing), (diff, report.summary())
            # an exact load of a changed checkpoint: the change was outside what is read
            # (another prefix, a key dropped on purpose) or did not change a value
            assert diff or report.partial or mutated is None or mutation in ('flip', 'dtype') or (
                report.prefix and not mutated.startswith(report.prefix)) or any(
                    mutated.startswith(ignored) for ignored in report.ignored), report.summary()
        elif entry == 'scales' and mutation == 'reshape':
            pass  # another valid length: whether it fits is checked when the model is built
        elif entry != 'mmengine' or mutation in ('none', 'flip'):
            assert not diff, (mutated, diff)  # tools, expand, scales loader: exact or refused
        assert mutation not in ('payload_top', 'payload_value', 'truncate', 'garbage')
    finally:
        assert not marker.exists(), 'the pickle payload ran'
        shutil.rmtree(work)
        if url:
            path.unlink()
            if (cache / name).exists():
                (cache / name).unlink()
    assert not [f for f in cache.glob('*') if f.is_file()] if cache.exists() else True
