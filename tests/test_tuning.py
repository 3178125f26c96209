"""featx.tuning: the choice of decode workers, torch threads and batch size from measured costs, its cache, and how
`featx extract` reports and applies it."""
from __future__ import annotations

import json

import pytest

import featx.tuning as tuning
from featx import extract, open_store
from featx.errors import FeatxError
from featx.tuning import Costs, decide, tune

SETTING = {"backbone": "resnet18", "taps": ["flatten"], "crop": 32, "resize": 36, "precision": "fp32", "device": "cpu"}


def test_amx_like_costs_overlap_a_worker_with_two_model_threads():
    """The fast-model CPU: decoding 5 ms, the model 13 ms on one thread and 7 ms on two. One worker beside two
    threads (about 105 img/s) beats decoding in this process (83) and one thread each (77)."""
    costs = Costs(0.005, {1: 0.013, 2: 0.007})
    workers, threads, batch, rate = decide(costs, 2, 10_000)
    assert (workers, threads) == (1, 2)
    assert rate == pytest.approx(2 / (0.005 + 2 * 0.007))
    assert batch == 36  # 0.25 s of the model
    assert decide(costs, 2, 10_000, workers=0)[:2] == (0, 2)  # a given count is kept, the rest fits around it


def test_cheap_decoding_stays_in_this_process():
    """Decoding 0.2 ms beside a 10 ms model: a worker gains under 3%, so none is started."""
    assert decide(Costs(0.0002, {1: 0.020, 2: 0.010}), 2, 10_000)[:2] == (0, 2)


def test_threads_that_do_not_pay_are_not_used():
    """A busy machine: two threads make the model slower (each waits for a core), so one thread and one worker."""
    assert decide(Costs(0.005, {1: 0.020, 2: 0.050}), 2, 10_000)[:2] == (1, 1)


def test_decode_bound_runs_spread_over_four_cores():
    """Decoding 40 ms, the model 20 ms on one thread and 6 ms on four (interpolated in between): three workers and
    two threads are the fewest that reach the best rate within 3%."""
    costs = Costs(0.040, {1: 0.020, 4: 0.006})
    assert costs.model_at(2) == pytest.approx(0.020 / (1 + (0.020 / 0.006 - 1) / 3))
    assert decide(costs, 4, 10_000)[:2] == (3, 2)
    assert decide(costs, 4, 10_000, max_threads=1)[:2] == (2, 1)


def test_batch_bounds():
    costs = Costs(0.005, {1: 0.013, 2: 0.007})
    assert decide(costs, 2, 100)[2] == 25  # four batches for the one worker
    assert decide(costs, 2, 10_000, max_batch=20)[2] == 20  # what fits in memory
    assert decide(Costs(0.005, {1: 1e-5}), 1, 10_000)[2] == tuning.MAX_BATCH
    assert decide(Costs(0.005, {1: 5.0}), 1, 10_000)[2] == tuning.MIN_BATCH
    assert decide(costs, 2, 10_000, batch_size=7)[2] == 7


class Probe:
    """A stand-in decoder and model that count their calls."""

    def __init__(self):
        self.decoded = self.forwards = 0

    def decode(self, path):
        self.decoded += 1
        return path

    def forward(self, images):
        self.forwards += 1
        return sum(range(20_000))

    def tune(self, n=tuning.PROBE_RUN, **given):
        return tune([f"img{i}.jpg" for i in range(n)], self.decode, self.forward, SETTING, **given)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "idle_cores", lambda: 2)
    return tmp_path / "cache" / "tuning"


def test_measured_once_then_cached(cache):
    probe = Probe()
    first = probe.tune()
    assert first.how == "measured" and probe.decoded == tuning.PROBE_IMAGES and probe.forwards >= 2
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("resnet18-")
    again = Probe()
    second = again.tune()
    assert second.how == "cached" and (again.decoded, again.forwards) == (0, 0)
    assert (second.workers, second.threads, second.batch_size) == (first.workers, first.threads, first.batch_size)
    assert second.to_dict()["decode_seconds"] == first.to_dict()["decode_seconds"]


def test_another_machine_or_model_is_measured_again(cache, monkeypatch):
    Probe().tune()
    monkeypatch.setattr(tuning, "cpu_fields", lambda: {"model": "Another CPU", "flags": "avx2"})
    other = Probe()
    assert other.tune().how == "measured" and other.forwards
    monkeypatch.undo()
    monkeypatch.setenv("FEATX_CACHE_DIR", str(cache.parent))
    monkeypatch.setattr(tuning, "idle_cores", lambda: 2)
    model = Probe()
    paths = [f"i{i}" for i in range(tuning.PROBE_RUN)]
    result = tune(paths, model.decode, model.forward, {**SETTING, "backbone": "resnet50"})
    assert result.how == "measured" and model.forwards
    assert len(list(cache.iterdir())) == 3


def test_a_file_of_another_key_is_redone_and_rewritten(cache):
    """A cache file copied from another machine under this machine's name: its recorded key differs, so the costs
    are measured here and the file rewritten with this key."""
    Probe().tune()
    (file,) = cache.iterdir()
    data = json.loads(file.read_text())
    data["key"]["cpu"] = "A machine elsewhere"
    data["costs"]["decode_seconds"] = 123.0
    file.write_text(json.dumps(data))
    probe = Probe()
    choice = probe.tune()
    assert choice.how == "measured" and probe.forwards
    rewritten = json.loads(file.read_text())
    assert rewritten["key"]["cpu"] != "A machine elsewhere" and rewritten["costs"]["decode_seconds"] != 123.0


@pytest.mark.parametrize("content", ["{not json", "[]", '{"key": 1}', "", "\x00\xff"])
def test_a_corrupt_file_is_ignored_and_rewritten(cache, content):
    Probe().tune()
    (file,) = cache.iterdir()
    file.write_text(content, encoding="latin-1")
    probe = Probe()
    assert probe.tune().how == "measured" and probe.forwards
    assert Costs.from_dict(json.loads(file.read_text())["costs"]).decode > 0


def test_impossible_costs_are_measured_again(cache):
    Probe().tune()
    (file,) = cache.iterdir()
    data = json.loads(file.read_text())
    data["costs"]["model_seconds"] = {"1": -1.0}
    file.write_text(json.dumps(data))
    assert Probe().tune().how == "measured"


def test_small_runs_and_given_options_measure_nothing(cache):
    probe = Probe()
    small = probe.tune(n=tuning.PROBE_RUN - 1)
    assert small.how.startswith("defaults") and small.batch_size == tuning.DEFAULT_BATCH
    given = probe.tune(workers=0, threads=1, batch_size=5)
    assert (given.workers, given.threads, given.batch_size) == (0, 1, 5)
    assert given.given == ("--workers", "--threads", "--batch-size")
    assert (probe.decoded, probe.forwards) == (0, 0) and not cache.exists()


def test_an_unwritable_cache_folder_does_not_stop_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FEATX_CACHE_DIR", str(blocker))
    probe = Probe()
    assert probe.tune().how == "measured"
    assert probe.tune().how == "measured"  # nothing kept, measured again


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("FEATX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_folder() == tmp_path / "featx" / "tuning"


# -- featx extract ----------------------------------------------------------------------------------------------

@pytest.fixture
def folder(image_folders):
    return image_folders(per_class=tuning.PROBE_RUN // 2)


def test_extract_reports_and_records_the_choice(cli, folder, tmp_path, cache):
    out = tmp_path / "s.h5"
    res = cli("extract", folder, "-o", out, "-b", "resnet18", "-w", "none", "--image-size", "32", "--json")
    assert res.exit_code == 0, res.output
    chosen = json.loads(res.stdout)["tuning"]
    assert chosen["how"] == "measured" and chosen["given"] == []
    assert 0 <= chosen["workers"] <= 2 and 1 <= chosen["threads"] <= 2 and 1 <= chosen["batch_size"] <= 16
    assert chosen["decode_seconds"] > 0 and chosen["model_seconds"]
    with open_store(out) as st:
        assert st.config["tuning"] == chosen
    res = cli("extract", folder, "-o", tmp_path / "t.h5", "-b", "resnet18", "-w", "none", "--image-size", "32",
              "--json", "--workers", "0", "--threads", "1", "--batch-size", "3")
    chosen = json.loads(res.stdout)["tuning"]
    assert (chosen["workers"], chosen["threads"], chosen["batch_size"]) == (0, 1, 3)
    assert chosen["how"].startswith("defaults") and chosen["given"] == ["--workers", "--threads", "--batch-size"]


def test_extract_restores_torch_threads(folder, tmp_path, cache):
    import torch

    before = torch.get_num_threads()
    extract(folder, tmp_path / "s.h5", backbone="resnet18", weights="none", image_size=32, threads=2, workers=0)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("option, value", [("--workers", "-1"), ("--workers", "100000"), ("--threads", "0"),
                                           ("--threads", "100000"), ("--batch-size", "0")])
def test_counts_out_of_range_one_line_exit_2(cli, folder, tmp_path, option, value):
    res = cli("extract", folder, "-o", tmp_path / "s.h5", "-b", "resnet18", "-w", "none", option, value)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and option in lines[0], res.output
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("given, message", [(dict(workers=100000), "workers=100000"), (dict(threads=0), "threads=0"),
                                            (dict(threads=100000), "threads=100000"), (dict(workers=1.5), "workers=1.5")])
def test_api_counts_out_of_range(folder, tmp_path, given, message):
    with pytest.raises(FeatxError, match=message):
        extract(folder, tmp_path / "s.h5", backbone="resnet18", weights="none", **given)
