"""Untrusted files: damaged, truncated, foreign or newer stores, random bytes named .h5, pickles.

Stores: every read gives a one-line FeatxError or correct data, never a traceback, a crash or a hang (the store
reader is fuzzed with hypothesis under a watchdog that turns a hang into a failure). Heads: the pickle-free format
is the default and a joblib pickle is loaded only with --trust. Weights and checkpoints: every torch.load in the
package uses weights_only=True (checked on the source), and a malicious pickle is refused, not executed.
"""
from __future__ import annotations

import ast
import faulthandler
import io
import json
import pickle
import shutil
import struct
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featx
from featx.cli import main as cli
from featx.errors import FeatxError
from featx.store import SCHEMA_VERSION, open_store, write_store

from .helpers import FAST, assert_one_line_error, featx as run_featx, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PACKAGE = Path(featx.__file__).parent
WATCHDOG_S = 60  # a read that takes this long is a hang: dump the stacks and stop the test run
N, D = 240, 48


# --------------------------------------------------------------------------------------------------------------------
# damaged stores


def _valid_store(path: Path) -> Path:
    """A small but complete store: two taps (float32, float16), labels, splits, failures, non-ASCII paths."""
    rng = np.random.default_rng(0)
    write_store(
        path, config={"backbone": "resnet18", "weights": "none", "taps": ["avgpool", "layer3"]},
        keys=[f"{i:064x}" for i in range(N)], paths=[f"c{i % 3}/img é {i}.png" for i in range(N)],
        labels=[i % 3 for i in range(N)], splits=["train", "val", ""] * (N // 3), classes=["a", "b", "c"],
        features={"avgpool": rng.normal(size=(N, D)).astype(np.float32),
                  "layer3": rng.normal(size=(N, 16)).astype(np.float16)},
        failed=[("c0/broken.jpg", "empty file (0 bytes)")],
    )
    return path


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> bytes:
    return _valid_store(tmp_path_factory.mktemp("good") / "good.h5").read_bytes()


def read_everything(path: Path) -> str:
    """What `featx info`, fit-head and predict read: metadata, summary, every tap whole, in chunks and by rows.
    Returns 'ok' or 'refused' (a one-line FeatxError); any other exception fails the test."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        with open_store(path) as store:
            store.summary()
            for tap in store.taps:
                store.features(tap)
                for _ in store.iter_features(tap, chunk_rows=50):
                    pass
                if len(store):
                    store.features(tap, [len(store) - 1, 0, 0])
        return "ok"
    except FeatxError as err:
        assert "\n" not in str(err), str(err)
        return "refused"
    finally:
        faulthandler.cancel_dump_traceback_later()


def _mutate(data: bytes, edits, cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, chunk in edits:
        position %= len(buf)
        buf[position : position + len(chunk)] = chunk[: len(buf) - position]
    return bytes(buf[:cut] if cut is not None else buf)


FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
outcomes: dict[str, int] = {}


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.one_of(
        st.binary(min_size=1, max_size=16), st.just(b"\0" * 16), st.just(b"\0" * 4096), st.just(b"\xff" * 8),
    )), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 200_000)),
)
def test_fuzzed_store_is_refused_in_one_line_or_read(tmp_path_factory, good_store, edits, cut):
    path = tmp_path_factory.getbasetemp() / "fuzzed.h5"
    path.write_bytes(_mutate(good_store, edits, cut))
    result = read_everything(path)
    outcomes[result] = outcomes.get(result, 0) + 1


def test_fuzz_outcomes(tmp_path_factory, good_store):
    """Both outcomes occurred: the fuzzer reached damage that is refused and damage that still reads."""
    if not outcomes:  # selected on its own: run the fuzzer here
        test_fuzzed_store_is_refused_in_one_line_or_read(tmp_path_factory, good_store)
    print(f"\nstore fuzz: {outcomes}")
    assert outcomes.get("ok", 0) > 0 and outcomes.get("refused", 0) > 0


@FUZZ
@given(data=st.binary(max_size=4096), hdf5_signature=st.booleans())
def test_random_bytes_named_h5_are_refused(tmp_path_factory, data, hdf5_signature):
    path = tmp_path_factory.getbasetemp() / "random.h5"
    path.write_bytes((b"\x89HDF\r\n\x1a\n" if hdf5_signature else b"") + data)
    assert read_everything(path) == "refused"


def _first_string_heap(data: bytes) -> int:
    """Byte offset of the first heap object header of the collection /items/path points into."""
    with h5py.File(io.BytesIO(data), "r") as h5:
        offset = h5["items/path"].id.get_offset()
    _, address, _ = struct.unpack_from("<IQI", data, offset)
    assert data[address : address + 4] == b"GCOL"
    return address + 16


def _damaged_variants(good: bytes, tmp: Path) -> dict[str, Path]:
    """One file per kind of damage seen in the wild or found by the fuzzer (several used to hang or crash)."""
    with h5py.File(io.BytesIO(good), "r") as h5:
        refs = h5["items/path"].id.get_offset()  # (length, collection address, index) per string
    variants = {
        "zeroed heap object (libhdf5 loops forever on it)": _mutate(good, [(_first_string_heap(good), b"\0" * 16)], None),
        "string length of 3.5 GB (libhdf5 allocates it)": _mutate(good, [(refs + 16 * 7, struct.pack("<I", 3_500_000_000))], None),
        "truncated to half": good[: len(good) // 2],
        "truncated to the superblock": good[:96],
        "empty file": b"",
        "random bytes": np.random.default_rng(3).bytes(70_000),
    }
    paths = {}
    for i, (name, data) in enumerate(variants.items()):
        paths[name] = tmp / f"damaged-{i}.h5"
        paths[name].write_bytes(data)
    # valid HDF5, but not what featx expects
    newer = tmp / "newer.h5"
    newer.write_bytes(good)
    with h5py.File(newer, "r+") as h5:
        h5.attrs["featx_schema"] = SCHEMA_VERSION + 1
    paths["newer schema"] = newer
    foreign = tmp / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["X"] = np.zeros((3, 2))
    paths["foreign HDF5"] = foreign
    wrong_type = tmp / "wrong-type.h5"
    wrong_type.write_bytes(good)
    with h5py.File(wrong_type, "r+") as h5:
        del h5["items/path"]
        h5["items/path"] = np.arange(N, dtype=np.float64)
    paths["paths stored as numbers"] = wrong_type
    bad_schema = tmp / "bad-schema.h5"
    bad_schema.write_bytes(good)
    with h5py.File(bad_schema, "r+") as h5:
        h5.attrs["featx_schema"] = "one"
    paths["schema attribute not a number"] = bad_schema
    short = tmp / "short-features.h5"
    short.write_bytes(good)
    with h5py.File(short, "r+") as h5:
        del h5["items/label"]
        h5["items/label"] = np.zeros(N + 5, dtype=np.int64)
    paths["rows that do not line up"] = short
    (tmp / "folder.h5").mkdir()
    paths["a folder named .h5"] = tmp / "folder.h5"
    return paths


def test_every_kind_of_damage_is_one_line_in_info_and_fit_head(tmp_path, good_store):
    runner = CliRunner()
    variants = _damaged_variants(good_store, tmp_path)
    started = time.monotonic()
    for name, path in variants.items():
        assert read_everything(path) == "refused", name
        for args in (["info", str(path)], ["fit-head", str(path), "-o", str(tmp_path / "head"), "--no-plots"]):
            faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
            result = runner.invoke(cli, args)
            faulthandler.cancel_dump_traceback_later()
            err = result.stderr.strip()
            if name == "a folder named .h5" and args[0] == "fit-head":  # click's usage error (head_cmds.py)
                assert result.exit_code == 2 and "is a folder" in err and "Traceback" not in err, result.output
                continue
            assert result.exit_code == 2 and err.startswith("featx: error: ") and "\n" not in err, (name, args, result.output)
    assert time.monotonic() - started < 60
    # and through real processes, the two that used to hang or allocate gigabytes
    for name in ("zeroed heap object (libhdf5 loops forever on it)", "string length of 3.5 GB (libhdf5 allocates it)"):
        result = run_featx("info", variants[name], timeout=120)
        assert_one_line_error(result, "damaged featx store")
        assert result.peak_rss_mb < 2000, result


def test_extract_onto_a_damaged_store_says_so_and_overwrite_replaces_it(tmp_path, good_store):
    data = tmp_path / "data"
    write_pngs(data, 12, size=16)
    store = tmp_path / "s.h5"
    store.write_bytes(_mutate(good_store, [(_first_string_heap(good_store), b"\0" * 16)], None))
    refused = run_featx("extract", data, "-o", store, *FAST)
    assert_one_line_error(refused, "damaged featx store", str(store), ": --overwrite replaces it")
    assert not store.with_name("s.h5.parts").exists()
    replaced = run_featx("extract", data, "-o", store, *FAST, "--overwrite")
    assert replaced.returncode == 0, replaced
    with open_store(store) as st:
        assert len(st) == 12


# --------------------------------------------------------------------------------------------------------------------
# pickles: heads, weights, checkpoints


class Payload:
    """Unpickling this creates `marker`: proof that pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_package_calls_torch_load_only_with_weights_only_true():
    """Scan the package's source: every torch.load passes weights_only=True literally; pickle/joblib loads exist
    only behind the --trust gate; np.load never allows pickles."""
    offenders, torch_loads, gated = [], 0, []
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        aliases = {alias.asname or alias.name: f"{node.module}.{alias.name}"
                   for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                   for alias in node.names}
        functions = {child: fn.name for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for child in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            name = aliases.get(name, name)
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{file.relative_to(PACKAGE.parent)}:{node.lineno} {name}"
            if name in ("torch.load", "torch.serialization.load", "serialization.load"):
                torch_loads += 1
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(where)
            elif name in ("np.load", "numpy.load"):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    offenders.append(where)
            elif name in ("pickle.load", "pickle.loads", "joblib.load", "cloudpickle.load", "dill.load",
                          "torch.jit.load", "pickle.Unpickler", "marshal.loads"):
                gated.append((str(file.relative_to(PACKAGE)), functions.get(node)))
    assert torch_loads >= 2 and not offenders, offenders
    assert set(gated) <= {("heads/persistence.py", "_load_pickle")}, gated


@pytest.fixture(scope="module")
def head_setup(tmp_path_factory):
    """A store of two separable classes, a head fitted on it with a joblib export."""
    tmp = tmp_path_factory.mktemp("heads")
    rng = np.random.default_rng(1)
    labels = np.arange(120) % 2
    write_store(
        tmp / "s.h5", config={"backbone": "resnet18", "weights": "none", "taps": ["avgpool"]},
        keys=[f"{i:064x}" for i in range(120)], paths=[f"x/{i}.png" for i in range(120)], labels=labels,
        classes=["a", "b"], features={"avgpool": (rng.normal(size=(120, 8)) + labels[:, None] * 3).astype(np.float32)},
    )
    result = CliRunner().invoke(cli, ["fit-head", str(tmp / "s.h5"), "-o", str(tmp / "head"), "--joblib", "--no-plots",
                                      "--grid", "1"])
    assert result.exit_code == 0, result.output
    return tmp


def test_heads_are_pickle_free_and_joblib_needs_trust(head_setup, tmp_path):
    store, head = head_setup / "s.h5", head_setup / "head"
    evil_head = tmp_path / "head"
    shutil.copytree(head, evil_head)
    marker = tmp_path / "pwned"
    (evil_head / "model.joblib").write_bytes(pickle.dumps(Payload(marker)))
    runner = CliRunner()

    # the default: the folder is loaded from head.json + weights.npz; the pickle beside them is never touched
    ok = runner.invoke(cli, ["predict", str(evil_head), str(store), "--json"])
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)) == 120 and not marker.exists()
    for command in (["predict", str(evil_head / "model.joblib"), str(store)],
                    ["evaluate", str(evil_head / "model.joblib"), str(store)]):
        refused = runner.invoke(cli, command)
        err = refused.stderr.strip()
        assert refused.exit_code == 2 and "\n" not in err and "--trust" in err and "pickle" in err, refused.output
        assert not marker.exists()
    # with --trust the user's own joblib export loads
    trusted = runner.invoke(cli, ["evaluate", str(head / "model.joblib"), str(store), "--trust", "--json"])
    assert trusted.exit_code == 0 and json.loads(trusted.stdout)["accuracy"] == 1.0, trusted.output
    with np.load(head / "weights.npz", allow_pickle=False) as npz:  # the default format holds arrays only
        assert all(npz[name].dtype != object for name in npz.files)


def test_malicious_weights_and_checkpoints_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "extra": Payload(marker)}, evil)
    plain_pickle = tmp_path / "evil.pkl.pth"
    plain_pickle.write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
    data = tmp_path / "data"
    write_pngs(data, 8, size=16)
    runner = CliRunner()
    for weights in (evil, plain_pickle):
        for command in (["extract", str(data), "-o", str(tmp_path / "s.h5"), "-b", "resnet18", "-w", str(weights),
                         "--image-size", "32", "--workers", "0", "-q"],
                        ["finetune", str(data), "-o", str(tmp_path / "run"), "-b", "resnet18", "-w", str(weights),
                         "--epochs", "1", "--batch-size", "2", "--image-size", "32", "--workers", "0", "-q"]):
            result = runner.invoke(cli, command)
            last = result.stderr.strip().splitlines()[-1]  # finetune logs what it loaded before the error
            assert result.exit_code == 2 and last.startswith(f"featx: error: -w {weights}: "), result.output
            assert "Traceback" not in result.output and not marker.exists(), command
    # a run folder whose checkpoint.pt was replaced: --resume refuses it
    run = tmp_path / "resume-run"
    started = runner.invoke(cli, ["finetune", str(data), "-o", str(run), "-b", "resnet18", "-w", "none",
                                  "--epochs", "1", "--batch-size", "2", "--image-size", "32", "--workers", "0", "-q"])
    assert started.exit_code == 0 and (run / "checkpoint.pt").is_file(), started.output
    torch.save({"format": 1, "epoch": 1, "payload": Payload(marker)}, run / "checkpoint.pt")
    result = runner.invoke(cli, ["finetune", "--resume", str(run), "--epochs", "2", "-q"])
    err = result.stderr.strip()
    assert result.exit_code == 2 and "checkpoint" in err and "\n" not in err, result.output
    assert not marker.exists()
