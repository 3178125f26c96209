"""POST /v1/search in featx serve: the same neighbours as `featx neighbors`, for uploaded images (embedded with the
store's extractor) and JSON embeddings, and a 4xx with a reason for every client mistake."""
from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

import featx  # noqa: E402
from featx.errors import FeatxError  # noqa: E402
from featx.serve.options import ServeOptions  # noqa: E402
from featx.serve.service import Service  # noqa: E402
from serve_support import image_files, make_head, running  # noqa: E402

JPEG = "image/jpeg"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data, store, head = make_head(root)
    return root, data, store, head


@pytest.fixture(scope="module")
def client(made):
    _, _, store, head = made
    with running(heads=[str(head)], search=[str(store)]) as c:
        yield c


def test_uploaded_images_get_the_neighbours_featx_neighbors_gives(client, made):
    root, data, store, _ = made
    image = image_files(data)[0]
    answer = client.post("/v1/search?k=4&tap=avgpool", content=image.read_bytes(), headers={"content-type": JPEG})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    result = body["results"][0]
    expected = featx.neighbors(store, [str(image)], k=4, tap="avgpool").records[0]
    assert result["row"] == "/".join(image.parts[-2:]) and expected["row"] is not None
    assert [h["path"] for h in result["neighbors"]] == [h["path"] for h in expected["neighbors"]]
    np.testing.assert_allclose([h["score"] for h in result["neighbors"]],
                               [h["score"] for h in expected["neighbors"]], rtol=1e-5)
    assert result["row"] not in [h["path"] for h in result["neighbors"]]  # its own row is left out
    assert body["store"] == "colours" and body["tap"] == "avgpool" and body["note"] is None


def test_an_image_the_store_lacks_finds_its_twin(client, made, tmp_path):
    _, data, _, _ = made
    image = image_files(data)[3]
    buffer = io.BytesIO()
    Image.open(image).save(buffer, format="PNG")  # the same pixels, other bytes
    answer = client.post("/v1/search?tap=avgpool&k=1", files=[("file", ("twin.png", buffer.getvalue(), "image/png"))])
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    top = result["neighbors"][0]
    assert result["row"] is None and top["path"].endswith(image.name) and top["score"] > 0.999
    assert top["label"] == image.parent.name


def test_json_embeddings_and_clamped_k(client, made):
    _, _, store, _ = made
    with featx.open_store(store) as opened:
        X, paths = opened.features("layer3")[:2], list(opened.paths[:2])
    answer = client.post("/v1/search?tap=layer3&k=500", json={"embeddings": X.tolist()})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [r["neighbors"][0]["path"] for r in body["results"]] == paths  # a stored row is its own nearest
    assert len(body["results"][0]["neighbors"]) == 18 and "clamped" in body["note"]


@pytest.mark.parametrize("url,kwargs,status,reason", [
    ("/v1/search?store=nope", {"json": {"embeddings": [[1.0]]}}, 404, "no search store named 'nope'"),
    ("/v1/search", {"json": {"embeddings": [[1.0]]}}, 422, "choose one with ?tap="),
    ("/v1/search?tap=fc", {"json": {"embeddings": [[1.0]]}}, 422, "tap 'fc'"),
    ("/v1/search?tap=avgpool", {"json": {"embeddings": [[1.0, 2.0]]}}, 422, "embeddings of shape (1, 2)"),
    ("/v1/search?tap=avgpool", {"json": {"vectors": []}}, 422, "expected {\"embeddings\""),
    ("/v1/search?tap=avgpool", {"json": [1, 2]}, 422, "expected a JSON object"),
    ("/v1/search?tap=avgpool&k=0", {"json": {"embeddings": [[1.0]]}}, 422, "k"),
    ("/v1/search?tap=avgpool", {"content": b"not an image", "headers": {"content-type": JPEG}}, 422, "request body"),
    ("/v1/search?tap=avgpool", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "content type"),
])
def test_client_mistakes_are_4xx_with_a_reason(client, url, kwargs, status, reason):
    answer = client.post(url, **kwargs)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["detail"]


def test_declared_in_the_openapi_document(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/search"]["post"]
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/octet-stream", "image/*",
                                                        "application/json"}
    assert {"404", "415", "422"} <= set(operation["responses"])


def test_without_search_stores_the_route_says_how(made):
    with running(heads=[str(made[3])]) as c:
        answer = c.post("/v1/search", json={"embeddings": [[1.0]]})
    assert answer.status_code == 404 and "--search STORE" in answer.json()["detail"]


def test_bad_search_stores_are_refused_at_start_up(made, tmp_path):
    _, _, store, head = made
    (tmp_path / "notes.h5").write_text("no")
    for path, message in [(tmp_path / "missing.h5", "no such store"), (tmp_path / "notes.h5", "not a readable"),
                          (store, "named 'colours' too")]:
        paths = [str(store), str(path)] if path == store else [str(path)]
        with pytest.raises(FeatxError, match=message):
            Service(ServeOptions(heads=[str(head)], search=paths).checked())
