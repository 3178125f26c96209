"""featx.runtime: --device and --precision resolution, the autocast context, model placement, loader workers."""
import pytest
import torch

from featx import runtime
from featx.errors import FeatxError
from featx.runtime import (Runtime, default_workers, loader_workers, prepare_model, resolve_device,
                           resolve_precision, resolve_runtime)

CPU = torch.device("cpu")


@pytest.mark.parametrize("spec", ["cpu", " CPU ", "auto", None])
def test_cpu_and_auto_resolve_here(spec):
    assert resolve_device(spec).type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("spec, message", [
    ("gpu", "device='gpu': expected one of"),
    ("cuda:x", "device='cuda:x': expected one of"),
])
def test_unknown_devices_name_the_option(spec, message):
    with pytest.raises(FeatxError, match=message):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_says_what_to_use():
    with pytest.raises(FeatxError, match="CUDA is not available.*device='cpu'"):
        resolve_device("cuda:0")


def test_precision_choices_on_the_cpu(monkeypatch):
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("BF16", CPU) == "bf16"
    with pytest.raises(FeatxError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(FeatxError, match="precision='int8': expected one of"):
        resolve_precision("int8", CPU)
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda fast=fast: fast)
        assert resolve_precision("auto", CPU) == expected


def test_autocast_runs_at_the_resolved_precision():
    x = torch.ones(2, 4)
    layer = torch.nn.Linear(4, 3)
    with Runtime(CPU, "fp32").autocast():
        assert layer(x).dtype == torch.float32
    with Runtime(CPU, "bf16").autocast():
        assert layer(x).dtype == torch.bfloat16
    assert resolve_runtime("cpu", "fp32").describe() == "cpu fp32 channels_last"


def test_prepare_model_places_convolutions_channels_last():
    model = prepare_model(torch.nn.Conv2d(3, 8, 3), Runtime(CPU, "fp32"))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)


def test_loader_workers_never_exceed_the_batches():
    assert loader_workers(4, n_items=10, batch_size=8) == 2
    assert loader_workers(0, n_items=100, batch_size=8) == 0
    assert loader_workers(None, n_items=10_000, batch_size=8) == default_workers()
    assert 1 <= default_workers() <= 8
