"""The CPU path of --launcher pytorch: decided on the config with the CLI overrides merged."""
import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config

from mmreparam.cli.toolbox import setup_cpu_distributed

TORCHRUN_ENV = dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1')


@pytest.fixture
def cpu_torchrun(monkeypatch):
    """torchrun's environment (one process), no GPU."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for key, value in dict(TORCHRUN_ENV, MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def cfg(**kwargs):
    return Config(dict(model=dict(type='X'), **kwargs))


def test_adds_cpu_ddp_and_keeps_cli_overrides(cpu_torchrun):
    argv = ['c.py', '--launcher', 'pytorch', '--cfg-options', 'find_unused_parameters=True']
    out = setup_cpu_distributed(cfg(), argv)
    assert dist.is_initialized() and dist.get_backend() == 'gloo'
    assert out[:len(argv)] == argv
    assert 'model_wrapper_cfg.device_ids=None' in out
    assert 'model_wrapper_cfg.find_unused_parameters=True' in out
    assert 'model_wrapper_cfg.find_unused_parameters=False' not in out


def test_refuses_what_cannot_run_on_cpu(cpu_torchrun):
    with pytest.raises(ValueError, match="sync_bn='torch'"):
        setup_cpu_distributed(cfg(sync_bn='torch'), ['c.py', '--launcher', 'pytorch'])
    with pytest.raises(ValueError, match='MMFullyShardedDataParallel'):
        setup_cpu_distributed(cfg(), [
            'c.py', '--launcher', 'pytorch', '--cfg-options',
            'model_wrapper_cfg.type=MMFullyShardedDataParallel'])


def test_untouched_without_the_pytorch_launcher_or_with_a_gpu(cpu_torchrun, monkeypatch):
    assert setup_cpu_distributed(cfg(), ['c.py']) == ['c.py']
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    argv = ['c.py', '--launcher', 'pytorch']
    assert setup_cpu_distributed(cfg(), argv) == argv


def test_needs_torchrun_environment(cpu_torchrun, monkeypatch):
    monkeypatch.delenv('MASTER_PORT')
    with pytest.raises(ValueError, match='MASTER_PORT'):
        setup_cpu_distributed(cfg(), ['c.py', '--launcher=pytorch'])
