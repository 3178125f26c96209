"""The stat index: `featx extract` reads a file's bytes only when its stat changed (or with --rehash), at most once
per run, and ignores an index that is not this machine's, not this data's, or not one entry per row."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.keys import RACY_NS, STAT_FIELDS, StatIndex, file_keys, file_stat
from featx.sources import load_source
from featx.store import open_store
from cli_support import featx as featx_process
from imagegen import make_image
from options_support import EXTRACT_ARGS

FAST = [*EXTRACT_ARGS, "--json"]
# Runs the CLI in a fresh interpreter with featx.keys.content_key counting the files it reads and
# featx.sources.decode_image the images it decodes (before featx.runner takes it), and prints the counts (and whether
# torch was imported) after it. It runs as `python -c PROBE featx ARGS` (featx_process with it as the launcher).
PROBE = (
    "import sys, json\n"
    "import featx.keys as keys, featx.sources as sources\n"
    "read, decoded = [], []\n"
    "real, real_decode = keys.content_key, sources.decode_image\n"
    "keys.content_key = lambda path: read.append(path) or real(path)\n"
    "sources.decode_image = lambda path, **kw: decoded.append(path) or real_decode(path, **kw)\n"
    "from featx.cli import main\n"
    "try:\n    main(sys.argv[2:])\nexcept SystemExit as e:\n    code = e.code\n"
    "print(json.dumps({'read': len(read), 'distinct': len(set(read)), 'decoded': len(decoded), "
    "'torch': 'torch' in sys.modules, 'code': code}))\n"
)


def featx(*args) -> tuple[dict, dict, str]:
    """(the --json result, {files read, distinct files read, torch imported, exit code}, stderr) of `featx ARGS`."""
    proc = featx_process(*args, launcher=[sys.executable, "-c", PROBE], timeout=300,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    *body, probe = proc.stdout.strip().splitlines()
    text = "\n".join(body)
    return (json.loads(text) if text.startswith("{") else {}), json.loads(probe), proc.stderr


@pytest.fixture
def made(image_folder, tmp_path):
    """A store of 6 images whose stats are old enough to be trusted (not 'racily clean')."""
    data = image_folder
    time.sleep(RACY_NS / 1e9 + 0.1)
    out = tmp_path / "s.h5"
    result, probe, err = featx("extract", data, "-o", out, *FAST)
    assert probe["code"] == 0, err
    assert (result["computed"], probe["read"], probe["distinct"]) == (6, 6, 6)  # each file read once
    return data, out


def test_unchanged_rerun_reads_no_image_bytes(made):
    data, out = made
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["reused"]) == (0, 6)
    assert probe == {"read": 0, "distinct": 0, "decoded": 0, "torch": False, "code": 0}


def test_rehash_reads_every_file_once(made):
    data, out = made
    result, probe, _ = featx("extract", data, "-o", out, *FAST, "--rehash")
    assert result["computed"] == 0 and (probe["read"], probe["distinct"], probe["torch"]) == (6, 6, False)


def test_a_changed_file_is_read_again_and_only_it(made):
    data, out = made
    victim = next((data / "ants").iterdir())
    make_image(victim, cls=0, seed=99)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["reused"]) == (1, 5)
    assert (probe["read"], probe["distinct"]) == (1, 1)  # once, although the up-to-date check ran before the run
    with open_store(out) as store:
        assert hashlib.sha256(victim.read_bytes()).hexdigest() in set(store.keys)
    _, probe, _ = featx("extract", data, "-o", out, *FAST)  # the seal recorded its new stat
    assert probe["read"] <= 1 and probe["torch"] is False  # re-read only while its stat is racily clean


def test_a_new_file_is_the_only_one_read(made):
    data, out = made
    make_image(data / "bees" / "new.png", cls=1, seed=77)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], probe["read"]) == (1, 1)


def test_same_stat_replacement_is_trusted_unless_rehash(made, monkeypatch):
    """A file replaced while size, mtime_ns, ctime_ns and inode stay the same (ctime cannot be set from user
    space: the stat is pinned here) keeps its old key: the documented risk; --rehash finds it."""
    from featx import keys
    from featx.extraction import extract

    data, out = made
    victim = sorted((data / "bees").iterdir())[0]
    recorded = file_stat(str(victim))
    old_key = hashlib.sha256(victim.read_bytes()).hexdigest()
    new_bytes = bytearray(victim.read_bytes())
    new_bytes[-5] ^= 0xFF  # same size, other content
    victim.write_bytes(bytes(new_bytes))
    real = keys.file_stats

    def pinned(paths):
        stats, readable = real(paths)
        stats[paths.index(str(victim))] = recorded
        return stats, readable

    monkeypatch.setattr(keys, "file_stats", pinned)
    options = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0)
    trusted = extract(data, out, **options)
    assert (trusted.n_computed, trusted.sealed) == (0, False)
    with open_store(out) as store:
        assert old_key in set(store.keys)
    rehashed = extract(data, out, **options, rehash=True)
    assert rehashed.n_computed == 1
    with open_store(out) as store:
        assert hashlib.sha256(bytes(new_bytes)).hexdigest() in set(store.keys) and old_key not in set(store.keys)


def _rewrite_index(out: Path, change) -> None:
    with h5py.File(out, "r+") as h5:
        stat = h5["items/stat"]
        values, host = stat[...], stat.attrs["host"]
        del h5["items/stat"]
        values, host = change(values, host)
        h5["items"].create_dataset("stat", data=values).attrs["host"] = host


@pytest.mark.parametrize("change", [
    lambda values, host: (values, "another-machine"),  # a store copied from elsewhere with its data
    lambda values, host: (values[:-1], host),  # not one entry per row: rows added by another tool
], ids=["other-machine", "row-count"])
def test_an_index_that_does_not_fit_is_ignored(made, change):
    data, out = made
    _rewrite_index(out, change)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["reused"], probe["read"], probe["torch"]) == (0, 6, 6, False)


def test_another_folder_of_the_same_files_is_read(made, tmp_path):
    """Entries are looked up by data root and path: a copy of the folder is read (its rows are reused by content)."""
    data, out = made
    copy = tmp_path / "copy"
    os.rename(data, copy)
    result, probe, _ = featx("extract", copy, "-o", out, *FAST, "--prune")
    assert (result["computed"], result["reused"], probe["read"]) == (0, 6, 6)


def test_racily_clean_entries_are_not_trusted(image_folders):
    data = image_folders(per_class=2)
    source = load_source(str(data))
    first = file_keys(source, str(data))
    assert first.n_read == 4 and all(first.keys)
    roots, row_roots, paths = [str(data)], np.zeros(4, dtype=np.int32), [it.relpath for it in source.items]
    host = StatIndex(roots, row_roots, paths, first.keys, first.stats, None)  # no host recorded: ignored
    assert len(host) == 0
    from featx.keys import host_id

    fresh = StatIndex(roots, row_roots, paths, first.keys, first.stats, host_id())
    assert len(fresh) == 0  # written just now: within RACY_NS of being read
    aged = first.stats.copy()
    aged[:, STAT_FIELDS.index("read_ns")] += RACY_NS + 1
    trusted = StatIndex(roots, row_roots, paths, first.keys, aged, host_id())
    again = file_keys(source, str(data), trusted)
    assert again.n_read == 0 and again.keys == first.keys
    assert file_keys(source, str(data), trusted, rehash=True).n_read == 4


def test_an_unchanged_rerun_records_the_stats_it_had_to_read(made):
    """Files keyed while racily clean (written just before they were read) are read again by the next rerun, which
    records their stat without importing torch or changing a row: the rerun after it reads nothing."""
    data, out = made

    def racy(values, host):
        values[:, 5] = np.maximum(values[:, 1], values[:, 2])  # read in the very tick they were written
        return values, host

    _rewrite_index(out, racy)
    with open_store(out) as store:
        keys = list(store.keys)
        assert len(StatIndex.of_store(store)) == 0
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], probe["read"], probe["torch"]) == (0, 6, False)
    with open_store(out) as store:
        assert list(store.keys) == keys and len(StatIndex.of_store(store)) == 6
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["reused"], probe["read"], probe["torch"]) == (0, 6, 0, False)


def test_a_read_only_store_answers_an_unchanged_rerun_without_recording(made):
    from readonly import read_only

    data, out = made
    _rewrite_index(out, lambda values, host: (values, "another-machine"))  # every file must be read
    before = out.read_bytes()
    with read_only(out.parent):
        result, probe, err = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["reused"], probe["read"], probe["code"]) == (0, 6, 6, 0), err
    assert out.read_bytes() == before


@pytest.fixture
def failing(image_folder, tmp_path):
    """A store of 6 images and one undecodable file (text named .jpg), all old enough to be trusted."""
    data = image_folder
    bad = data / "bees" / "bad.jpg"
    bad.write_text("not an image")
    time.sleep(RACY_NS / 1e9 + 0.1)
    out = tmp_path / "s.h5"
    result, probe, err = featx("extract", data, "-o", out, *FAST)
    assert probe["code"] == 0, err
    assert (result["computed"], result["failed"], probe["decoded"]) == (6, 1, 7)
    return data, out, bad


def test_an_unchanged_undecodable_file_is_neither_read_nor_decoded_again(failing):
    data, out, bad = failing
    with open_store(out) as store:
        assert store.failed_keys.tolist() == [hashlib.sha256(bad.read_bytes()).hexdigest()]
        assert store.failed_stats[0, :5].tolist() == list(file_stat(str(bad)))
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert probe == {"read": 0, "distinct": 0, "decoded": 0, "torch": False, "code": 0}
    assert (result["computed"], result["reused"], result["failed"], result["still_failing"]) == (0, 6, 1, 1)
    assert [f["path"] for f in result["failures"]] == ["bees/bad.jpg"]
    victim = next((data / "ants").iterdir())
    make_image(victim, cls=0, seed=99)
    result, probe, _ = featx("extract", data, "-o", out, *FAST)  # a real run does not decode it either
    assert (result["computed"], result["failed"], result["still_failing"]) == (1, 1, 1)
    assert (probe["read"], probe["decoded"], probe["torch"]) == (1, 1, True)


def test_an_undecodable_file_whose_content_changed_is_tried_again(failing):
    data, out, bad = failing
    bad.write_text("still not an image, but other bytes")
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["failed"], result["still_failing"]) == (0, 1, 0)
    assert (probe["read"], probe["decoded"]) == (1, 1)
    with open_store(out) as store:
        assert store.failed_keys.tolist() == [hashlib.sha256(bad.read_bytes()).hexdigest()]
    make_image(bad, cls=1, seed=5)  # now a good image
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["computed"], result["failed"], result["items"], probe["decoded"]) == (1, 0, 7, 1)
    with open_store(out) as store:
        assert store.failed == [] and "bees/bad.jpg" in set(store.paths)


def test_failures_recorded_without_keys_are_decoded_once_more_and_then_recorded(failing):
    """A store written before failures had keys (or by another tool): its failures are tried again, once."""
    data, out, bad = failing
    with h5py.File(out, "r+") as h5:
        del h5["failed/key"], h5["failed/stat"]
    result, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (result["failed"], result["still_failing"], probe["decoded"], probe["torch"]) == (1, 0, 1, True)
    with open_store(out) as store:
        assert store.failed_keys.tolist() == [hashlib.sha256(bad.read_bytes()).hexdigest()]
    _, probe, _ = featx("extract", data, "-o", out, *FAST)
    assert (probe["decoded"], probe["torch"]) == (0, False)
