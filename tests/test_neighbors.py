"""featx neighbors: exact chunked cosine search equals brute force, rows and images as queries (images embedded
with the store's own extractor, stored content reused), near-duplicate pairs, and one line for every mistake."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import featx
from featx.errors import FeatxError
from featx.heads import search
from featx.heads.neighbors import duplicates, neighbors
from heads_support import blob_store, write_rows
from imagegen import make_image_folder
from cli_support import invoke as run
from options_support import HEAD_EXTRACT as EXTRACT


def brute_force(Q, X, k, exclude):
    Qn, Xn = search.normalized(Q), search.normalized(X)
    sims = Qn @ Xn.T
    for i, row in enumerate(exclude):
        if row >= 0:
            sims[i, row] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(X)), sims.shape), -sims), axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("chunk_rows,cells,query_block", [(None, search.SCORE_CELLS, search.QUERY_BLOCK),
                                                         (7, 20, 3), (1, 1, 1)])
def test_chunked_search_equals_brute_force(monkeypatch, chunk_rows, cells, query_block):
    monkeypatch.setattr(search, "SCORE_CELLS", cells)
    monkeypatch.setattr(search, "QUERY_BLOCK", query_block)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(53, 6)).astype(np.float32)
    X[10] = X[11]  # a tie: the lower row comes first
    Q = rng.normal(size=(9, 6)).astype(np.float32)
    Q[0] = X[10]
    exclude = np.array([-1, 3, -1, 52, -1, -1, 0, -1, -1])
    hits = search.top_k(search.normalized(Q), search.array_blocks(search.normalized(X), chunk_rows), len(X), 5, exclude)
    rows, scores = brute_force(Q, X, 5, exclude)
    np.testing.assert_array_equal(hits.rows, rows)
    np.testing.assert_allclose(hits.scores, scores, rtol=1e-5)
    assert hits.rows[0, 0] == 10 and hits.rows[0, 1] == 11


def test_rows_as_queries_by_path_and_key(tmp_path):
    X, y = blob_store(tmp_path / "s.h5", n=30, d=8, k=3)
    result = neighbors(tmp_path / "s.h5", ["img/0004.png", f"{25:064x}"], k=4, tap="avgpool", chunk_rows=4)
    first, second = result.records
    assert first["row"] == 4 and second["row"] == 25
    rows, scores = brute_force(X[[4, 25]], X, 4, np.array([4, 25]))
    assert [h["row"] for h in first["neighbors"]] == list(rows[0])
    assert [h["row"] for h in second["neighbors"]] == list(rows[1])
    np.testing.assert_allclose([h["score"] for h in first["neighbors"]], scores[0], rtol=1e-5)
    assert all(h["label"] == "ants" for h in first["neighbors"])  # separable classes: its own class first
    assert first["neighbors"][0]["path"].startswith("img/") and result.note == ""


def test_k_above_the_store_is_clamped_with_a_note(tmp_path):
    blob_store(tmp_path / "s.h5", n=12, d=4, k=2)
    result = neighbors(tmp_path / "s.h5", ["img/0000.png"], k=50, tap="avgpool")
    assert len(result.records[0]["neighbors"]) == 11
    assert result.note.startswith(f"{tmp_path / 's.h5'} holds 12 rows, so each query gets 11 of the 50 neighbours")
    answer = run("neighbors", tmp_path / "s.h5", "img/0000.png", "-k", 50, "-l", "avgpool", "--json")
    assert answer.exit_code == 0, answer.output
    assert f"featx: warning: {tmp_path / 's.h5'} holds 12 rows" in answer.output


def test_duplicates_finds_the_planted_pairs(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 16)).astype(np.float32)
    X[30] = X[3] * 2.0 + 0.001  # the same direction: cosine ~1
    X[17] = X[5] + rng.normal(scale=0.01, size=16).astype(np.float32)
    write_rows(tmp_path / "s.h5", X, extra_tap=False)
    found = duplicates(tmp_path / "s.h5", threshold=0.98, chunk_rows=6)
    assert [(p["a"], p["b"]) for p in found.pairs] == [("img/0003.png", "img/0030.png"),
                                                       ("img/0005.png", "img/0017.png")]
    assert found.pairs[0]["score"] >= found.pairs[1]["score"] >= 0.98
    with pytest.raises(FeatxError, match="more than 10 pairs"):
        duplicates(tmp_path / "s.h5", threshold=-1.0, max_pairs=10)
    answer = run("neighbors", tmp_path / "s.h5", "--duplicates", "--json")
    assert answer.exit_code == 0 and len(json.loads(answer.output)["pairs"]) == 2


@pytest.mark.parametrize("args,message", [
    (["img/0000.png", "-l", "nope"], "tap 'nope' is not in"),
    (["img/0000.png"], "holds taps avgpool, layer4: choose one with -l"),
    (["missing.jpg", "-l", "avgpool"], "QUERY missing.jpg: no such file or folder"),
    ([], "give at least one QUERY"),
    (["img/0000.png", "--duplicates"], "give no QUERY"),
])
def test_mistakes_are_one_line(tmp_path, args, message):
    blob_store(tmp_path / "s.h5", n=12, d=4, k=2)
    answer = run("neighbors", tmp_path / "s.h5", *args)
    assert answer.exit_code == 2, answer.output
    assert answer.output.strip().splitlines()[-1].startswith("featx: error: ")
    assert message in answer.output and "Traceback" not in answer.output


def test_a_store_of_maps_is_refused(tmp_path):
    from featx.store import write_store

    write_store(tmp_path / "maps.h5", config={"taps": ["layer3"]}, keys=[f"{i:064x}" for i in range(3)],
                paths=["a", "b", "c"], labels=None, targets=None, splits=None, classes=[],
                features={"layer3": np.ones((3, 2, 2, 2), dtype=np.float32)})
    with pytest.raises(FeatxError, match=r"\(pooling 'none'\): search needs pooled rows; extract the tap with "
                                         r"featx\.extract\(\.\.\., pooling='avg'\) / `featx extract --pooling avg`$"):
        neighbors(tmp_path / "maps.h5", ["a"])


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    data = make_image_folder(root / "data", per_class=3)
    featx.extract(data, root / "g.h5", **EXTRACT)
    return root


def test_image_queries_use_the_stored_rows_or_the_store_extractor(image_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(image_store / "g.h5", "g.h5")
    stored = image_store / "data" / "ants" / "ants_001.png"
    # the same pixels, other bytes: not in the store, so embedded with the store's extractor
    Image.open(stored).save("resaved.png", compress_level=0)
    result = neighbors("g.h5", [str(stored)], k=3)
    assert result.records[0]["row"] is not None and not (tmp_path / "g.queries.h5").exists()
    result = neighbors("g.h5", ["resaved.png"], k=3)
    top = result.records[0]["neighbors"][0]
    assert result.records[0]["row"] is None and top["path"] == "ants/ants_001.png" and top["score"] > 0.9999
    assert (tmp_path / "g.queries.h5").exists()
    with featx.open_store("g.queries.h5") as cache:
        assert len(cache) == 1  # the query store holds the query, the gallery is unchanged
    with featx.open_store("g.h5") as gallery:
        assert len(gallery) == 6


def test_an_undecodable_query_image_is_one_line(image_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(image_store / "g.h5", "g.h5")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    answer = run("neighbors", "g.h5", "broken.jpg", "-q")
    assert answer.exit_code == 2, answer.output
    last = answer.output.strip().splitlines()[-1]
    assert last.startswith("featx: error: QUERY ") and "broken.jpg" in last


def test_memory_stays_bounded_whatever_the_store(tmp_path, monkeypatch):
    """The streamed search holds one chunk and one block of scores: tracemalloc (which sees numpy's arrays) peaks
    far below the store's size."""
    import tracemalloc

    from featx.heads.neighbors import gallery_blocks

    monkeypatch.setattr(search, "CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(search, "SCORE_CELLS", 1 << 16)
    X = np.random.default_rng(2).normal(size=(20_000, 64)).astype(np.float32)  # 5 MiB of rows
    write_rows(tmp_path / "s.h5", X, extra_tap=False)
    Q = search.normalized(X[:50])
    with featx.open_store(tmp_path / "s.h5") as store:
        blocks = gallery_blocks(store, "avgpool")
        tracemalloc.start()
        hits = search.top_k(Q, blocks, len(store), 10)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < (1 << 20) + 12 * (1 << 16) + (1 << 18), peak  # one chunk + scores + positions + slack
    np.testing.assert_array_equal(hits.rows[:, 0], np.arange(50))
