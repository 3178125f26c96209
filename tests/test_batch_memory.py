"""featx.memory: a batch that cannot fit is refused in one line before anything is written, at every command whose
options size a batch (extract, predict through extract, finetune, serve's extractor, layers' probe)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from featx.backbones import load_backbone
from featx.errors import FeatxError
from featx.extraction import extract
from featx.runner import FeatureRunner, runner_from_config
from featx.finetuning import finetune
from featx.options import flag_spelling
from featx.layer_table import describe_layers
from featx import memory
from featx.cli import main
from featx.memory import available_bytes, batch_memory, check_batch_memory, out_of_memory_as_error
from options_support import EXTRACT

CPU = torch.device("cpu")
GB = 10**9


@pytest.fixture(scope="module")
def resnet18():
    return load_backbone("resnet18", "none").model


def limit_memory(monkeypatch, available: int | None) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)


def test_the_largest_batch_it_suggests_fits_and_one_more_does_not(resnet18, monkeypatch):
    need = batch_memory(resnet18, 512)
    limit_memory(monkeypatch, need.bytes(5) + need.per_image // 2)
    check_batch_memory(resnet18, 512, 5, CPU)
    with pytest.raises(FeatxError) as err:
        check_batch_memory(resnet18, 512, 64, CPU)
    assert str(err.value).startswith("image_size=512, batch_size=64: a batch of 64 images needs about ")
    assert str(err.value).endswith(": use batch_size=5 or less, or a smaller image_size")
    assert err.value.spelled(flag_spelling(main.commands["extract"].params)).startswith(
        "--image-size 512, --batch-size 64: a batch of 64 images needs about ")
    with pytest.raises(FeatxError, match=r"batch_size=20: a batch of 6 images needs .*use batch_size=5 or less"):
        check_batch_memory(resnet18, 512, 20, CPU, n_images=6)  # only 6 images: batches of 6
    check_batch_memory(resnet18, 512, 64, CPU, n_images=5)


def test_one_image_too_large_names_the_sizes(resnet18, monkeypatch):
    limit_memory(monkeypatch, 2 * GB)
    with pytest.raises(FeatxError) as err:
        check_batch_memory(resnet18, 64, 8, CPU, resize=40_000, resize_option="resize")
    assert str(err.value) == (
        "image_size=64, resize=40000: one image alone needs about 9.6 GB of memory and cpu has 2.0 GB available: "
        "use a smaller image_size or resize"
    )
    with pytest.raises(FeatxError, match=r"^224x224 images, max_batch=4000: a batch of 4000 images .*use max_batch=\d+ or less$"):
        check_batch_memory(resnet18, 224, 4000, CPU, size_option=None, batch_option="max_batch")
    limit_memory(monkeypatch, None)  # a device whose free memory is unknown: no check
    check_batch_memory(resnet18, 100_000, 64, CPU)


def test_training_keeps_every_output_and_the_optimizer_states(resnet18):
    inference, training = batch_memory(resnet18, 224), batch_memory(resnet18, 224, training=True)
    weights = sum(p.numel() * 4 for p in resnet18.parameters())
    assert training.per_image > 3 * inference.per_image and training.fixed == memory.TRAINING_STATES * weights
    assert batch_memory(resnet18, 224, on_device=True).fixed == weights


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_estimate_is_near_the_measured_peak():
    """The estimate of an inference batch stays within a factor 1.6 of the resident memory a real forward pass adds
    (fp32, channels_last, as extract runs it), measured in a fresh process: the peak is reset just before the
    forward pass, and every large block is mapped and unmapped (no dynamic malloc threshold keeps freed memory)."""
    script = textwrap.dedent("""
        import json, torch
        from featx.backbones import load_backbone
        from featx.taps import feature_extractor
        from featx.memory import batch_memory
        from featx.preprocess import TransformSpec, normalize_batch
        from featx.runtime import prepare_model, resolve_runtime

        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

        torch.set_num_threads(1)
        bb = load_backbone("resnet18", "none")
        runtime = resolve_runtime("cpu", "fp32")
        model = prepare_model(feature_extractor(bb.model, {"flatten": "x"}).eval(), runtime)
        spec, size, batch = TransformSpec(resize=768, crop=768), 768, 4
        with torch.inference_mode():
            model(normalize_batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), spec, runtime.device, True))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current resident size
        before = status("VmRSS")
        with torch.inference_mode():
            pixels = torch.full((batch, 3, size, size), 7, dtype=torch.uint8)
            model(normalize_batch(pixels, spec, runtime.device, True))
        print(json.dumps({"measured": status("VmHWM") - before, "estimate": batch_memory(bb.model, size).bytes(batch)}))
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300,
                         env=env)
    sizes = json.loads(out.stdout.splitlines()[-1])
    assert sizes["measured"] / 1.6 < sizes["estimate"] < sizes["measured"] * 1.6, sizes


def test_available_bytes_is_the_lower_of_the_system_and_the_control_group(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP_V2", cgroup)
    monkeypatch.setattr(memory, "CGROUP_V1", tmp_path / "none")
    assert available_bytes(CPU) == 20000000 * 1024  # no control group files
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_bytes(CPU) == 20000000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{4 * GB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GB}\n")
    (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {GB // 2}\nactive_file 7\n")
    assert available_bytes(CPU) == GB + GB // 2
    assert available_bytes(torch.device("meta")) is None


def test_extract_refuses_a_size_that_cannot_fit_before_creating_anything(image_folder, tmp_path):
    with pytest.raises(FeatxError, match=r"^image_size=100000: one image alone needs about .* TB of memory and cpu"):
        extract(image_folder, tmp_path / "s.h5", **{**EXTRACT, "image_size": 100_000, "batch_size": 6})
    assert list(tmp_path.iterdir()) == [image_folder]


def test_an_allocation_failing_mid_run_keeps_the_committed_batches(image_folder, tmp_path, monkeypatch):
    calls = []
    run = FeatureRunner.__call__

    def failing_second_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:  # the dry run, one committed batch, then this one
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return run(self, batch)

    monkeypatch.setattr(FeatureRunner, "__call__", failing_second_batch)
    out = tmp_path / "s.h5"
    with pytest.raises(FeatxError, match=r"^out of memory on cpu at batch_size=4: try batch_size=2$"):
        extract(image_folder, out, **EXTRACT)
    monkeypatch.setattr(FeatureRunner, "__call__", run)
    result = extract(image_folder, out, **EXTRACT)
    assert (result.n_reused, result.n_computed) == (4, 2)


def test_out_of_memory_as_error_lets_other_errors_through():
    with pytest.raises(ValueError, match="not memory"):
        with out_of_memory_as_error("batch_size", 8, CPU):
            raise ValueError("not memory")
    with pytest.raises(RuntimeError, match="shapes differ"):
        with out_of_memory_as_error("batch_size", 8, CPU):
            raise RuntimeError("shapes differ")
    with pytest.raises(FeatxError, match=r"^out of memory on cpu at batch_size=1: try a smaller image_size$"):
        with out_of_memory_as_error("batch_size", 1, CPU):
            raise MemoryError()
    for text in ("DataLoader worker (pid(s) 3676) exited unexpectedly",
                 "Caught RuntimeError in DataLoader worker process 0.\nRuntimeError: can't allocate memory"):
        with pytest.raises(FeatxError, match=r"^a decoding process ran out of memory at batch_size=8 .*: try lower "
                                             r"resize or workers$"):
            with out_of_memory_as_error("batch_size", 8, CPU, decode_options=("resize", "workers")):
                raise RuntimeError(text)


def test_resizing_decoders_count_once_each(resnet18):
    """A decoder resizes the shorter side to --resize before cropping: each decoding process holds one such image."""
    plain = batch_memory(resnet18, 64)
    one, four = batch_memory(resnet18, 64, resize=30_000), batch_memory(resnet18, 64, resize=30_000, decoders=4)
    assert one.fixed - plain.fixed >= 3 * 30_000 * 30_000 * 4 / 3  # a 4:3 photo at that size, at least
    assert four.fixed - plain.fixed == 4 * (one.fixed - plain.fixed) and four.per_image == one.per_image


def test_finetune_refuses_before_the_run_folder_exists(image_folder, tmp_path, monkeypatch):
    limit_memory(monkeypatch, GB // 2)
    with pytest.raises(FeatxError, match=r"^image_size=512, batch_size=4: a batch .* use batch_size=[12] or less"):
        finetune(image_folder, tmp_path / "run", **{**EXTRACT, "image_size": 512}, epochs=1)
    assert not (tmp_path / "run").exists()


def test_serve_extractor_refuses_a_max_batch_that_cannot_fit(image_folder, tmp_path, monkeypatch):
    result = extract(image_folder, tmp_path / "s.h5", **EXTRACT)
    limit_memory(monkeypatch, GB)
    with pytest.raises(FeatxError, match=r"^32x32 images, max_batch=100000000: a batch of 100000000 images needs"):
        runner_from_config(result.config, "cpu", max_batch=10**8)
    assert runner_from_config(result.config, "cpu", max_batch=16).transform.crop == 32


def test_layers_probe_at_a_size_that_cannot_fit(resnet18, monkeypatch):
    limit_memory(monkeypatch, GB)
    with pytest.raises(FeatxError, match=r"^image_size=8000: one image alone needs about .* use a smaller image_size$"):
        describe_layers(resnet18, image_size=8000)
