"""featx serve's contract: the OpenAPI document (valid 3.1, every request body and answer declared, the error body
featx sends, security only with a key), both API key headers, and /docs and /redoc served from installed files.
The slow tests run schemathesis against a live server, and render /docs in headless Chromium where one is
installed."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
validate = pytest.importorskip("openapi_spec_validator").validate

from featx.serve.app import create_app  # noqa: E402
from featx.serve.options import ServeOptions  # noqa: E402
from featx.serve.service import Service  # noqa: E402
from serve_support import image_files, make_head  # noqa: E402

KEY_ENV, KEY = "FEATX_CONTRACT_TEST_KEY", "k3y-for-tests"
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable",
            "chrome")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    data, store, head = make_head(root)
    return root, data, store, head


@contextlib.contextmanager
def running(**options):
    service = Service(ServeOptions(**options).checked())
    with TestClient(create_app(service)) as client:
        for _ in range(600):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.02)
        yield client


@pytest.fixture(scope="module")
def client(made):
    with running(heads=[str(made[3])]) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(made):
    os.environ[KEY_ENV] = KEY
    try:
        with running(heads=[str(made[3])], api_key_env=KEY_ENV) as c:
            yield c
    finally:
        del os.environ[KEY_ENV]


def _operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def test_document_is_valid_and_declares_every_body_and_answer(client):
    document = client.get("/openapi.json").json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    operations = dict(_operations(document))
    for label, operation in operations.items():
        assert "security" not in operation, label
        answers = operation["responses"]
        success = next(status for status in answers if status.startswith("2"))
        for media in answers[success]["content"].values():
            assert media["schema"], (label, success)
        for status, answer in answers.items():
            if status.startswith("4") or (status == "503" and label != "GET /healthz"):
                assert answer["content"] == {"application/json": {"schema": ERROR_REF}}, (label, status)
        if label.startswith("POST ") and label != "POST /v1/admin/reload":
            assert operation["requestBody"]["required"] and operation["requestBody"]["content"], label
            assert {"413", "422"} <= set(answers), label
    body = operations["POST /v1/heads/{name}/predict"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/octet-stream", "image/*", "application/json"}
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["items"]["format"] == "binary"
    assert body["application/json"]["schema"]["required"] == ["embeddings"]
    assert set(operations["POST /v1/embed"]["requestBody"]["content"]) == {
        "multipart/form-data", "application/octet-stream", "image/*"}
    assert set(operations["POST /v1/heads/{name}/predict"]["responses"]["200"]["content"]) == {
        "application/json", "image/png"}
    assert {"401", "403"}.isdisjoint(operations["POST /v1/heads/{name}/predict"]["responses"])
    assert {"403", "409", "415"} <= set(operations["POST /v1/heads"]["responses"])
    assert operations["GET /metrics"]["responses"]["200"]["content"] == {
        "text/plain; version=0.0.4": {"schema": {"type": "string"}}}
    assert "securitySchemes" not in document.get("components", {})
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])


def test_security_is_declared_with_a_key(keyed):
    document = keyed.get("/openapi.json").json()
    validate(document)
    schemes = document["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"}
    assert (schemes["APIKeyHeader"]["in"], schemes["APIKeyHeader"]["name"]) == ("header", "X-API-Key")
    for label, operation in _operations(document):
        if label == "GET /healthz":
            assert "security" not in operation and "401" not in operation["responses"]
        else:
            assert operation["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}], label
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == ERROR_REF


@pytest.mark.parametrize("headers, status", [
    ({"authorization": f"Bearer {KEY}"}, 200),
    ({"x-api-key": KEY}, 200),
    ({"X-API-Key": KEY, "authorization": "Basic dTpw"}, 200),
    ({}, 401),
    ({"x-api-key": "wrong"}, 401),
    ({"authorization": "Bearer wrong", "x-api-key": KEY}, 200),
    ({"authorization": "Bearer wrong", "x-api-key": "wrong"}, 401),
    ({"authorization": KEY}, 401),
])
def test_either_key_header_is_accepted(keyed, headers, status):
    r = keyed.get("/v1/heads", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert "X-API-Key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/healthz").status_code == 200


def _conforms(document, operation, status, response):
    """Assert that `response` has a media type and a body the document declares for `operation` and `status`."""
    import jsonschema

    declared = operation["responses"][str(status)]["content"]
    media = response.headers["content-type"].split(";")[0]
    assert media in {m.split(";")[0] for m in declared}, (media, list(declared))
    if media == "application/json":
        schema = {**declared["application/json"]["schema"], "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(response.json())


def test_answers_conform_to_the_document(client, made, tmp_path):
    import featx

    document = client.get("/openapi.json").json()
    ops = dict(_operations(document))
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in image_files(made[1])[:3]]
    with featx.open_store(made[2]) as s:
        rows = s.features("avgpool")[:2].tolist()
    calls = [
        ("GET /healthz", client.get("/healthz"), 200),
        ("GET /metrics", client.get("/metrics"), 200),
        ("GET /v1/heads", client.get("/v1/heads"), 200),
        ("POST /v1/heads/{name}/predict", client.post("/v1/heads/colours/predict?top_k=2", files=files), 200),
        ("POST /v1/heads/{name}/predict", client.post("/v1/heads/colours/predict", json={"embeddings": rows}), 200),
        ("POST /v1/heads/{name}/predict", client.post("/v1/heads/nope/predict", files=files), 404),
        ("POST /v1/heads/{name}/predict", client.post("/v1/heads/colours/predict", content=b"x",
                                                      headers={"content-type": "text/plain"}), 415),
        ("POST /v1/heads/{name}/predict", client.post("/v1/heads/colours/predict?top_k=0", files=files), 422),
        ("POST /v1/embed", client.post("/v1/embed?tap=layer3", files=files), 200),
        ("POST /v1/embed", client.post("/v1/embed", content=files[0][1][1], headers={"content-type": "image/jpeg"}),
         200),
        ("POST /v1/admin/reload", client.post("/v1/admin/reload"), 200),
        ("POST /v1/heads", client.post("/v1/heads", json={}), 403),
        ("GET /v1/jobs/{job_id}", client.get("/v1/jobs/nope"), 404),
    ]
    for label, response, status in calls:
        assert response.status_code == status, (label, response.text)
        _conforms(document, ops[label], status, response)


ASSET_TYPES = {".js": ("application/javascript", "text/javascript"), ".css": ("text/css",), ".png": ("image/png",)}


@pytest.mark.parametrize("page, scripts", [("/docs", {"swagger-ui-bundle.js"}), ("/redoc", {"redoc.standalone.js"})])
def test_docs_pages_load_only_local_files(client, page, scripts):
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|url|spec-url)\s*[=:]\s*["']([^"']+)["']""", html.text)
    assert scripts <= {u.rsplit("/", 1)[-1] for u in urls}, urls
    assert "/openapi.json" in urls
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html.text, re.I), "a page loads from another host"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        r = client.get(url)
        assert r.status_code == 200, url
        suffix = os.path.splitext(url)[1]
        expected = ASSET_TYPES.get(suffix, ("application/json",))
        assert r.headers["content-type"].split(";")[0] in expected, (url, r.headers["content-type"])
        assert len(r.content) > 1000 or suffix == ".json", url


def test_client_mistakes_are_4xx_with_a_reason(client, made):
    image = image_files(made[1])[0].read_bytes()
    cases = [
        (dict(content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}), 403, "allow-training"),
        (dict(content=image, headers={"content-type": "image/jpeg"}), 403, "allow-training"),
    ]
    for kwargs, status, reason in cases:
        r = client.post("/v1/heads", **kwargs)
        assert r.status_code == status and reason in r.json()["detail"], r.text
    r = client.post("/v1/heads/colours/predict?top_k=abc", content=image, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and r.json()["detail"].startswith("top_k: "), r.text
    r = client.post("/v1/heads/colours/predict", json={"embeddings": "x"})
    assert r.status_code == 422 and "embeddings" in r.json()["detail"]


def test_training_request_mistakes(made, tmp_path):
    with running(heads=[str(made[3])], heads_dir=str(tmp_path / "heads"), allow_training=True) as c:
        cases = [
            (dict(content=b"name=x", headers={"content-type": "application/x-www-form-urlencoded"}), 415,
             "expected application/json"),
            (dict(content=b"{", headers={"content-type": "application/json"}), 422, "request body: not valid JSON"),
            (dict(json=[1]), 422, "request body: "),
            (dict(json={"name": "x"}), 422, "examples: Field required"),
            (dict(json={"name": "x", "examples": []}), 422, "examples: "),
            (dict(json={"name": "x y", "examples": [{"sha256": "0" * 64, "label": 1}]}), 422, "name: "),
            (dict(json={"name": "x", "examples": [{"label": 1}]}), 422,
             "examples.0.KeyedExample.sha256: Field required"),
            (dict(json={"name": "x", "examples": [{"sha256": "0", "label": 1}]}), 422,
             "examples.0.KeyedExample.sha256: String should match"),
            (dict(json={"name": "x", "examples": [{"sha256": "0" * 64, "label": 1, "other": 2}]}), 422,
             "examples.0.KeyedExample.other: Extra inputs"),
            (dict(json={"name": "x", "examples": [{"image_base64": "@@@@", "label": 1}]}), 422, "not valid base64"),
            (dict(json={"name": "x", "examples": [{"sha256": "0" * 64, "label": 1}], "options": {"seed": "1"}}), 422,
             "options.seed: Input should be a valid integer"),
            (dict(json={"name": "x", "examples": [{"sha256": "0" * 64, "label": 1}], "options": {"n_jobs": 4}}), 422,
             "options.n_jobs: Extra inputs"),
            (dict(content=b":\x7f\xff", headers={"content-type": "application/json"}), 422, "not valid JSON ('utf-8'"),
            (dict(json={"name": "x", "like": "nope", "examples": [{"sha256": "0" * 64, "label": 1}]}), 404, "no head"),
        ]
        for kwargs, status, reason in cases:
            r = c.post("/v1/heads", **kwargs)
            assert r.status_code == status and reason in r.json()["detail"], (kwargs, r.text)
        document = c.get("/openapi.json").json()
        ops = dict(_operations(document))
        files = image_files(made[1])
        embedded = c.post("/v1/embed", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files]).json()
        examples = [{"sha256": e["sha256"], "label": p.parent.name} for e, p in zip(embedded["results"], files)]
        job = c.post("/v1/heads", json={"name": "again", "like": "colours", "options": {"grid": "1", "val_split": 0},
                                        "examples": examples})
        assert job.status_code == 202, job.text
        _conforms(document, ops["POST /v1/heads"], 202, job)
        for _ in range(600):
            state = c.get(f"/v1/jobs/{job.json()['id']}")
            _conforms(document, ops["GET /v1/jobs/{job_id}"], 200, state)
            if state.json()["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.05)
        assert state.json()["state"] == "succeeded", state.text


# ---- against a live server (slow) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def segmentation_head(tmp_path_factory):
    """A segmentation head (fit-head --task segment) on a tiny folder of image/mask pairs."""
    import featx
    from featx.segment.probe import fit_dense_probe
    from maskgen import make_mask_folder

    root = tmp_path_factory.mktemp("contract-seg")
    data = make_mask_folder(root / "pairs", splits={"train": 4, "val": 1})
    featx.extract(data, root / "maps.h5", backbone="resnet18", weights="none", taps=["layer2"], pooling="none",
                  image_size=64, workers=0, precision="fp32", device="cpu")
    fit_dense_probe(root / "maps.h5", data, root / "people", binary=True, grid="1", pixels_per_image=32)
    return root / "people"


@pytest.fixture(scope="module")
def live(made, segmentation_head, tmp_path_factory):
    """`featx serve` on 127.0.0.1 and a free port, with a key, training on, a classification and a segmentation
    head: its base URL."""
    from featx.serve.server import start_process

    heads_dir = tmp_path_factory.mktemp("live-heads")
    proc, url = start_process([str(made[3]), str(segmentation_head), "--host", "127.0.0.1", "--api-key-env", KEY_ENV,
                               "--allow-training", "--heads-dir", str(heads_dir), "--max-bytes", "2000000"],
                              env={**os.environ, KEY_ENV: KEY})
    try:
        yield url
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=60)
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_nor_mismatch(live, tmp_path):
    """schemathesis run with its defaults (every check, every phase, 100 examples per operation) and
    tests/schemathesis.toml, against the live server: it exits 0 when it found nothing."""
    pytest.importorskip("schemathesis")
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(SCHEMATHESIS_CONFIG), "--no-color",
               "run", f"{live}/openapi.json", "--header", f"Authorization: Bearer {KEY}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-8000:]
    operations = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", report)
    assert operations and len(set(operations.groups())) == 1 and int(operations.group(1)) >= 8, report[-3000:]


def _browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason=f"no headless browser installed (none of {', '.join(BROWSERS)} on "
                    "PATH): /docs is not rendered in a browser here; test_docs_pages_load_only_local_files still "
                    "checks that it loads nothing from another host")
def test_docs_render_in_headless_chromium_with_no_network(live, tmp_path):
    url = live
    # Every host name but the server's fails to resolve: a page that needs a CDN renders nothing.
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=15000",
               "--dump-dom", f"{url}/docs"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert 'class="swagger-ui"' in dom, dom[-2000:]
    for rendered in ("featx serve", "/v1/heads/{name}/predict", "/v1/embed", "Authorize"):
        assert rendered in dom, rendered
