"""featx serve in-process: the routes through FastAPI's TestClient, batching through an async client."""
from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import featx  # noqa: E402
from featx.heads import load_head, predict  # noqa: E402
from featx.serve.app import create_app  # noqa: E402
from featx.serve.options import ServeOptions  # noqa: E402
from featx.serve.service import Service  # noqa: E402
from featx.sources import content_key  # noqa: E402
from imagegen import make_image, png_claiming  # noqa: E402
from serve_support import image_files, make_head, running  # noqa: E402

JPEG = "image/jpeg"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data, store, head = make_head(root)
    return root, data, store, head


@pytest.fixture(scope="module")
def client(made):
    with running(heads=[str(made[3])]) as c:
        yield c


def _files(paths):
    return [("file", (p.name, p.read_bytes(), JPEG)) for p in paths]


def test_predict_equals_featx_predict(client, made, tmp_path):
    _, data, _, head = made
    files = image_files(data)
    r = client.post("/v1/heads/colours/predict?top_k=2", files=_files(files))
    assert r.status_code == 200, r.text
    expected = predict(head, data, store=tmp_path / "cache.h5")
    by_name = {Path(str(n)).name: i for i, n in enumerate(expected.names)}
    results = r.json()["results"]
    assert len(results) == len(files)
    for path, got in zip(files, results):
        i = by_name[path.name]
        assert got["predicted"] == expected.predicted[i]
        assert got["sha256"] == content_key(path)
        probs = [got["probabilities"][c] for c in expected.classes]
        np.testing.assert_allclose(probs, expected.scores[i], rtol=1e-4, atol=1e-6)
        assert [t["class"] for t in got["top_k"]] == [expected.classes[j] for j in np.argsort(-expected.scores[i])[:2]]


def test_embed_equals_featx_extract(client, made):
    _, data, store, _ = made
    files = image_files(data)[:5]
    with featx.open_store(store) as s:
        row_of = {k: i for i, k in enumerate(s.keys)}
        for tap in ("layer3", "avgpool"):
            r = client.post(f"/v1/embed?tap={tap}", files=_files(files))
            assert r.status_code == 200, r.text
            expected = s.features(tap)
            for got in r.json()["results"]:
                np.testing.assert_allclose(got["embedding"], expected[row_of[got["sha256"]]], rtol=1e-4, atol=1e-5)


def test_raw_body_and_cache_flag(client, made, tmp_path):
    image = make_image(tmp_path / "new.png", 1, seed=999, size=(50, 40))
    body = {"content": image.read_bytes(), "headers": {"content-type": "image/png"}}
    first = client.post("/v1/heads/colours/predict", **body).json()["results"][0]
    second = client.post("/v1/heads/colours/predict", **body).json()["results"][0]
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["probabilities"] == second["probabilities"]


def test_json_embeddings(client, made):
    _, _, store, head_dir = made
    head = load_head(head_dir)
    with featx.open_store(store) as s:
        X = s.features("avgpool")[:4]
    r = client.post("/v1/heads/colours/predict", json={"embeddings": X.tolist()})
    assert r.status_code == 200, r.text
    assert [g["predicted"] for g in r.json()["results"]] == list(head.predict(X))
    wrong = client.post("/v1/heads/colours/predict", json={"embeddings": [[0.0] * 7]})
    assert wrong.status_code == 422 and "expects (rows, 512)" in wrong.json()["detail"]


@pytest.mark.parametrize("request_args, status, reason", [
    ({"content": b"not an image", "headers": {"content-type": JPEG}}, 422, "not a recognised image format"),
    ({"content": png_claiming(30000, 30000), "headers": {"content-type": "image/png"}}, 422, "decompression-bomb"),
    ({"content": b"", "headers": {"content-type": JPEG}}, 422, "empty"),
    ({"content": b"vm\n", "headers": {"content-type": "image/png"}}, 422, "not a recognised image format"),
    ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "content type 'text/plain'"),
    ({"files": [("other", ("a.txt", b"x", "text/plain"))]}, 422, "no `file` field"),
    ({"content": b"--b\r\n[{'x': 1}]--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422,
     "multipart body: Invalid multipart data"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
])
def test_bad_requests_are_4xx_with_a_reason(client, request_args, status, reason):
    r = client.post("/v1/heads/colours/predict", **request_args)
    assert r.status_code == status and reason in r.json()["detail"]


def test_unknown_head_tap_and_top_k(client, made):
    image = image_files(made[1])[0].read_bytes()
    raw = {"content": image, "headers": {"content-type": JPEG}}
    assert client.post("/v1/heads/nope/predict", **raw).status_code == 404
    r = client.post("/v1/embed?tap=layer1", **raw)
    assert r.status_code == 422 and "layer3, avgpool" in r.json()["detail"]
    r = client.post("/v1/heads/colours/predict?top_k=0", **raw)
    assert r.status_code == 422 and "top_k" in r.json()["detail"]


def test_heads_listing_and_metrics(client):
    (head,) = client.get("/v1/heads").json()["heads"]
    assert (head["name"], head["classes"], head["tap"], head["backbone"]) == (
        "colours", ["blue", "green", "red"], "avgpool", "resnet18")
    assert "/v1/heads/{name}/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    text = client.get("/metrics").text
    for name in ("featx_serve_requests_total", "featx_serve_request_seconds_bucket", "featx_serve_batch_size_bucket",
                 "featx_serve_cache_total", "featx_serve_images_per_second"):
        assert name in text


def test_body_limit_and_api_key(made, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", "s3cret")
    image = image_files(made[1])[0].read_bytes()
    with running(heads=[str(made[3])], max_bytes=len(image) - 1, api_key_env="SERVE_TEST_KEY") as c:
        raw = {"content": image, "headers": {"content-type": JPEG, "authorization": "Bearer s3cret"}}
        assert c.post("/v1/heads/colours/predict", **raw).status_code == 413
        chunked = c.post("/v1/heads/colours/predict", content=iter([image[:100], image[100:]]), headers=raw["headers"])
        assert chunked.status_code == 413 and "--max-bytes" in chunked.json()["detail"]
        assert c.get("/v1/heads").status_code == 401
        assert c.get("/v1/heads", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/heads", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_a_bad_image_fails_only_its_own_request(made):
    import httpx

    service = Service(ServeOptions(heads=[str(made[3])], max_batch=16, max_wait_ms=300).checked())
    files = image_files(made[1])[:6]

    async def run():
        transport = httpx.ASGITransport(app=create_app(service))  # no lifespan: the test starts the service
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            assert (await c.get("/healthz")).status_code == 503  # before the extractors are loaded
            early = await c.post("/v1/heads/colours/predict", content=b"x", headers={"content-type": JPEG})
            assert early.status_code == 503 and "still loading" in early.json()["detail"]
            await asyncio.get_running_loop().run_in_executor(None, service.start)
            bodies = [f.read_bytes() for f in files[:3]] + [b"broken"] + [f.read_bytes() for f in files[3:]]
            return await asyncio.gather(*(c.post("/v1/heads/colours/predict", content=b,
                                                 headers={"content-type": JPEG}) for b in bodies))

    try:
        answers = asyncio.run(run())
    finally:
        service.close()
    assert [a.status_code for a in answers] == [200] * 3 + [422] + [200] * 3
    count = service.metrics.registry.get_sample_value("featx_serve_batch_size_count")
    assert service.metrics.registry.get_sample_value("featx_serve_images_total") == 6
    assert count < 6  # the six good images shared forward passes


def test_rewritten_head_is_picked_up(made, tmp_path):
    _, data, store, _ = made
    folder = tmp_path / "colours"
    featx.fit_head(store, "avgpool", folder, grid="1", val_split=0, plots=False, n_jobs=1)
    raw = {"content": image_files(data)[0].read_bytes(), "headers": {"content-type": JPEG}}
    with running(heads=[str(folder)]) as c:
        before = c.post("/v1/heads/colours/predict", **raw).json()["results"][0]["probabilities"]
        featx.fit_head(store, "avgpool", folder, grid="1e-4", val_split=0, plots=False, n_jobs=1, overwrite=True)
        after = c.post("/v1/heads/colours/predict", **raw).json()["results"][0]["probabilities"]
        assert after != before and max(after.values()) < max(before.values())
        assert c.post("/v1/admin/reload").json() == {"heads": ["colours"]}


def test_training_through_the_service(made, tmp_path):
    _, data, _, head = made
    files = image_files(data)
    with running(heads=[str(head)], heads_dir=str(tmp_path / "heads"), allow_training=True) as c:
        embedded = c.post("/v1/embed", files=_files(files)).json()["results"]
        labels = ["warm" if f.parent.name == "red" else "cold" for f in files]
        examples = [{"sha256": e["sha256"], "label": lab} for e, lab in zip(embedded, labels)]
        examples[0] = {"image_base64": base64.b64encode(files[0].read_bytes()).decode(), "label": labels[0]}
        spec = {"name": "warmth", "like": "colours", "options": {"grid": "1", "val_split": 0}, "examples": examples}
        job = c.post("/v1/heads", json=spec)
        assert job.status_code == 202, job.text
        for _ in range(300):
            state = c.get(f"/v1/jobs/{job.json()['id']}").json()
            if state["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.05)
        assert state["state"] == "succeeded", state
        r = c.post("/v1/heads/warmth/predict", files=_files(files))
        assert [g["predicted"] for g in r.json()["results"]] == labels
        assert all(g["cached"] for g in r.json()["results"])
        bad = c.post("/v1/heads", json={**spec, "examples": [{"sha256": "0" * 64, "label": "x"}]})
        assert bad.status_code == 422 and "not in the cache" in bad.json()["detail"]
        assert c.post("/v1/heads", json={**spec, "name": "colours"}).status_code == 409
        broken = c.post("/v1/heads", json={**spec, "examples": [{"image_base64": "bm90IGFuIGltYWdl", "label": "x"}]})
        assert broken.status_code == 422 and broken.json()["detail"].startswith("examples[0]: not a recognised")


def test_cache_store_answers_without_the_backbone(made, tmp_path):
    _, data, store, head = made
    cache = tmp_path / "cache.h5"
    shutil.copy(store, cache)
    files = image_files(data)
    new = make_image(tmp_path / "extra.png", 2, seed=4242)
    with running(heads=[str(head)], cache=str(cache)) as c:
        r = c.post("/v1/heads/colours/predict", files=_files(files))
        assert all(g["cached"] for g in r.json()["results"])
        assert c.service.metrics.registry.get_sample_value("featx_serve_images_total") == 0
        c.post("/v1/embed", content=new.read_bytes(), headers={"content-type": "image/png"})
    with featx.open_store(cache) as s:  # sealed at shutdown: the old rows plus the new one
        assert len(s) == len(files) + 1 and content_key(new) in set(s.keys)
    assert not cache.with_name("cache.h5.parts").exists()


def test_start_up_errors_are_one_line(made, tmp_path, cli):
    head = str(made[3])
    copy = tmp_path / "x" / "colours"
    shutil.copytree(head, copy)
    (tmp_path / "broken").mkdir()
    featx.fit_head(made[2], "avgpool", tmp_path / "pickled", grid="1", val_split=0, plots=False, n_jobs=1, joblib=True)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        cases = [
            ([str(tmp_path / "missing")], "no such head folder"),
            ([str(tmp_path / "broken")], "not a featx head folder"),
            ([head, str(copy)], "a head named 'colours' is already served"),
            ([head, "--host", "0.0.0.0"], "needs an API key"),
            ([head, "--api-key-env", "FEATX_SERVE_UNSET_VAR"], "unset or empty"),
            ([head, "--port", port], "already in use"),
            ([str(tmp_path / "pickled" / "model.joblib")], "is a pickle"),
        ]
        for args, message in cases:
            result = cli("serve", *args)
            assert result.exit_code == 2, (args, result.output)
            assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_without_the_extra_one_line_names_it(made, monkeypatch, cli):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = cli("serve", made[3])
    assert result.exit_code == 2 and "pip install 'featx[serve]'" in result.output and "uvicorn" in result.output
