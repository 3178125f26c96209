"""featx export: clip-retrieval's npy + parquet layout and one parquet file, read back as other tools read them."""
from __future__ import annotations

import fcntl
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featx.errors import FeatxError
from featx.exporter import STAGING, export
from featx.store import Store, open_store, write_store
from cli_support import invoke
from readonly import read_only
from test_store_readers import make_store


@pytest.fixture
def store(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_store(tmp_path / "s.h5", root=str(data), dtype=np.float16)
    return tmp_path / "s.h5"


def featx(*words):
    result = invoke(*words)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def read_npy_header(path):
    """The header as embedding-reader parses it: the first line, a 2-D shape and a little-endian float descr."""
    with open(path, "rb") as f:
        first = f.read(300).split(b"\n")[0]
    rows, dim = map(int, re.search(r"'shape': \(([0-9]+), ([0-9]+)\)", str(first)).groups())
    return rows, dim, re.search(r"'descr': '([<f0-9]+)'", str(first)).group(1), len(first) + 1


def test_npy_layout_reads_like_embedding_reader(store, tmp_path):
    result = featx("export", store, "-o", tmp_path / "out", "-l", "avgpool", "--shard-rows", "2", "--chunk-rows", "3", "-q")
    assert result.exit_code == 0 and "exported 23 rows of avgpool (5 float16)" in result.output
    embs = sorted((tmp_path / "out/img_emb").iterdir())
    metas = sorted((tmp_path / "out/metadata").iterdir())
    assert [p.name for p in embs][:2] == ["img_emb_00.npy", "img_emb_01.npy"] and len(embs) == 12
    assert [p.name for p in metas][-1] == "metadata_11.parquet" and len(metas) == 12
    assert sorted(os.listdir(tmp_path / "out")) == ["img_emb", "metadata"]
    rows, frames = [], []
    for emb, meta in zip(embs, metas):  # embedding-reader pairs the files by sorted name, rows by position
        n, dim, descr, offset = read_npy_header(emb)
        assert dim == 5 and descr == "<f2"
        raw = np.frombuffer(emb.read_bytes()[offset:], dtype=descr).reshape(n, dim)
        np.testing.assert_array_equal(raw, np.load(emb))
        frame = pd.read_parquet(meta)
        assert len(frame) == n
        rows.append(raw)
        frames.append(frame)
    x, meta = np.concatenate(rows), pd.concat(frames, ignore_index=True)
    with open_store(store) as st:
        np.testing.assert_array_equal(x, st.features("avgpool").astype(np.float16))
        assert meta["key"].tolist() == list(st.keys) and meta["path"].tolist() == list(st.paths)
        assert meta["image_path"][5] == str(tmp_path / "data" / st.paths[5])
        assert meta["label"].tolist() == st.labels.tolist() and meta["split"].tolist() == list(st.splits)
    assert meta["class_name"][:3].tolist() == ["ants", "bees", "wasps"] and pd.isna(meta["class_name"].iloc[-1])
    provenance = json.loads(pq.read_schema(metas[0]).metadata[b"featx"])
    assert provenance["tap"] == "avgpool" and provenance["row_shape"] == [5] and provenance["config"]["backbone"] == "resnet18"


def test_one_parquet_file_with_a_fixed_size_list(store, tmp_path):
    result = export(store, tmp_path / "out", format="parquet", tap="layer4", chunk_rows=10)
    assert result.files == ["embeddings.parquet"] and result.dim == 18 and result.rows == 23
    path = tmp_path / "out/embeddings.parquet"
    table = pq.read_table(path)
    kind = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 18 and kind.value_type == pa.float32()
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert json.loads(table.schema.metadata[b"featx"])["row_shape"] == [2, 3, 3]
    frame = pd.read_parquet(path)
    with open_store(store) as st:
        expected = st.features("layer4").reshape(23, 18)
        assert frame["key"].tolist() == list(st.keys)
    np.testing.assert_array_equal(np.stack(frame["embedding"]), expected)
    np.testing.assert_array_equal(table["embedding"].combine_chunks().flatten().to_numpy().reshape(23, 18), expected)


def test_polars_and_duckdb_read_the_parquet_file(store, tmp_path):
    export(store, tmp_path / "out", format="parquet", tap="avgpool")
    path = str(tmp_path / "out/embeddings.parquet")
    with open_store(store) as st:
        expected = st.features("avgpool")
    polars = pytest.importorskip("polars")
    frame = polars.read_parquet(path)
    np.testing.assert_array_equal(frame["embedding"].to_numpy(), expected)
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"SELECT class_name, embedding FROM '{path}' WHERE split = 'val' ORDER BY key").fetchall()
    assert len(got) == 8 and got[0][0] == "bees" and np.allclose(got[0][1], expected[1])


def test_a_non_empty_folder_is_refused_unless_overwrite(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = featx("export", store, "-o", out, "-l", "avgpool")
    assert result.exit_code == 2 and result.output.splitlines() == [
        f"featx: error: -o {out}: the folder is not empty (mine.txt): choose a new or empty folder, or pass "
        f"--overwrite to replace an earlier export there"]
    assert os.listdir(out) == ["mine.txt"]
    assert featx("export", store, "-o", out, "-l", "avgpool", "--overwrite", "-q").exit_code == 0
    assert featx("export", store, "-o", out, "-l", "layer4", "--format", "parquet", "--overwrite").exit_code == 0
    assert sorted(os.listdir(out)) == ["embeddings.parquet", "mine.txt"]  # the earlier export went, the user's file stayed


@pytest.mark.parametrize("words, message", [
    (["-l", "fc"], "tap 'fc' is not in .*s.h5: it holds avgpool, layer4"),
    ([], "holds several taps \\(avgpool, layer4\\)"),
    (["-l", "avgpool", "-o", "x.parquet"], "-o x.parquet: expected a folder"),
    (["-l", "avgpool", "-o", "s.h5"], "-o s.h5: is a file, expected a folder"),
    (["-l", "avgpool", "--format", "csv"], "Invalid value for '--format'"),
    (["-l", "avgpool", "--shard-rows", "0"], "--shard-rows 0: expected a whole number of rows >= 1"),
])
def test_mistakes_are_one_line_and_leave_nothing(store, tmp_path, monkeypatch, words, message):
    monkeypatch.chdir(tmp_path)
    words = words if "-o" in words else [*words, "-o", "new/out"]
    result = featx("export", "s.h5", *words)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "new").exists()


def test_missing_and_empty_stores(tmp_path):
    result = featx("export", tmp_path / "nope.h5", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no such store" in result.output
    write_store(tmp_path / "e.h5", config={}, keys=[], paths=[], features={"avgpool": np.zeros((0, 4), np.float32)})
    with pytest.raises(FeatxError, match="holds no rows: nothing to export"):
        export(tmp_path / "e.h5", tmp_path / "out", tap="avgpool")
    assert not (tmp_path / "out").exists()


def test_a_read_only_destination(store, tmp_path):
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        for out in (tmp_path / "ro", tmp_path / "ro/sub"):
            result = featx("export", store, "-o", out, "-l", "avgpool")
            assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
            assert result.output.startswith(f"featx: error: -o {out}: cannot"), result.output
    assert os.listdir(tmp_path / "ro") == []


def test_ctrl_c_mid_export_leaves_no_file(store, tmp_path, monkeypatch):
    real = Store.batches

    def interrupted(self, *args, **kwargs):
        for i, batch in enumerate(real(self, *args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(Store, "batches", interrupted)
    (tmp_path / "empty").mkdir()
    for out, fmt in [(tmp_path / "new/out", "npy"), (tmp_path / "empty", "parquet")]:
        result = featx("export", store, "-o", out, "-l", "avgpool", "--format", fmt, "--chunk-rows", "2", "-q")
        assert result.exit_code == 130
        assert result.output.strip().splitlines() == [f"featx: interrupted (no partial export is left in {out})"]
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []


def test_one_export_at_a_time_and_a_killed_one_is_cleaned_up(store, tmp_path):
    out = tmp_path / "out"
    (out / STAGING / "img_emb").mkdir(parents=True)
    (out / STAGING / "img_emb/img_emb_0.npy").write_bytes(b"half")  # what kill -9 leaves
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(FeatxError, match="another featx export is writing there"):
            export(store, out, tap="avgpool")
    finally:
        os.close(fd)
    export(store, out, tap="avgpool")
    assert sorted(os.listdir(out)) == ["img_emb", "metadata"]
    assert len(np.load(out / "img_emb/img_emb_0.npy")) == 23


def test_embedding_reader_reads_the_npy_layout_unchanged(store, tmp_path):
    embedding_reader = pytest.importorskip("embedding_reader")
    export(store, tmp_path / "out", tap="avgpool", shard_rows=5)
    reader = embedding_reader.EmbeddingReader(str(tmp_path / "out/img_emb"), file_format="parquet_npy",
                                              metadata_folder=str(tmp_path / "out/metadata"),
                                              meta_columns=["key", "class_name"])
    got = list(reader(batch_size=7, start=0, end=reader.count, show_progress=False))
    with open_store(store) as st:
        np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), st.features("avgpool").astype(np.float16))
        assert pd.concat([m for _, m in got])["key"].tolist() == list(st.keys)


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    """write() fails with EFBIG past a file-size limit, as on a full disk: nothing half-written stays."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    make_store(tmp_path / "s.h5", n=500, d=256)
    for fmt in ("npy", "parquet"):
        done = subprocess.run([sys.executable, "-m", "featx", "export", "s.h5", "-o", "out", "-l", "avgpool", "-q",
                               "--format", fmt, "--chunk-rows", "50"], cwd=tmp_path, capture_output=True, text=True,
                              preexec_fn=limit, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("featx: error: -o out: cannot write") and "nothing was exported" in done.stderr
        assert not (tmp_path / "out").exists()
