"""featx serve as a real server process under load and faults (slow): 8 clients x 50 requests mixing good and bad
images, a head folder replaced during the load, and SIGTERM with requests in flight."""
from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import featx  # noqa: E402
from featx.heads import predict  # noqa: E402
from featx.serve.server import start_process  # noqa: E402
from imagegen import png_claiming  # noqa: E402
from serve_support import EXTRACT, image_files, make_head  # noqa: E402

pytestmark = pytest.mark.slow
CLIENTS, REQUESTS = 8, 50
JPEG = {"content-type": "image/jpeg"}


def expected_answers(head, data, store) -> dict[str, tuple[str, np.ndarray]]:
    """file name -> (predicted, probabilities) from `featx predict`."""
    preds = predict(head, data, store=store)
    return {Path(str(n)).name: (preds.predicted[i], preds.scores[i]) for i, n in enumerate(preds.names)}


def matches(result: dict, expected: tuple[str, np.ndarray], classes: list[str]) -> bool:
    probs = np.array([result["probabilities"][c] for c in classes])
    return result["predicted"] == expected[0] and np.allclose(probs, expected[1], rtol=1e-4, atol=1e-6)


def bad_requests(good: bytes) -> list[tuple[str, dict]]:
    """(path, httpx kwargs) of client mistakes: each must be a 4xx with a reason."""
    return [
        ("/v1/heads/colours/predict", {"content": b"definitely not an image", "headers": JPEG}),
        ("/v1/heads/colours/predict", {"content": good[: len(good) // 3], "headers": JPEG}),
        ("/v1/heads/colours/predict", {"content": png_claiming(40000, 40000), "headers": {"content-type": "image/png"}}),
        ("/v1/heads/nope/predict", {"content": good, "headers": JPEG}),
        ("/v1/heads/colours/predict", {"json": {"embeddings": [[1.0, 2.0]]}}),
        ("/v1/embed?tap=nope", {"content": good, "headers": JPEG}),
    ]


def test_load_faults_head_swap_and_sigterm(tmp_path):
    data, store, served = make_head(tmp_path)
    replacement = tmp_path / "replacement"
    featx.fit_head(store, "avgpool", replacement, grid="1e-3", val_split=0, plots=False, n_jobs=1)
    files = image_files(data)
    old = expected_answers(served, data, tmp_path / "old-cache.h5")
    new = expected_answers(replacement, data, tmp_path / "new-cache.h5")
    classes = ["blue", "green", "red"]
    assert any(not np.allclose(old[f.name][1], new[f.name][1]) for f in files)  # the swap is visible

    proc, url = start_process([str(served), "--max-batch", "8", "--max-wait-ms", "5"])
    statuses, wrong, swapped = [], [], threading.Event()

    def client(c: int):
        with httpx.Client(base_url=url, timeout=60) as http:
            for r in range(REQUESTS):
                n = c * REQUESTS + r
                if n == CLIENTS * REQUESTS // 3 and not swapped.is_set():
                    swapped.set()  # replace the served folder atomically, as fit-head --overwrite does
                    featx.fit_head(store, "avgpool", served, grid="1e-3", val_split=0, plots=False, n_jobs=1,
                                   overwrite=True)
                file = files[n % len(files)]
                if n % 4 == 3:
                    path, kwargs = bad_requests(file.read_bytes())[n % 6]
                    answer = http.post(path, **kwargs)
                    statuses.append(answer.status_code)
                    if not (400 <= answer.status_code < 500 and answer.json().get("detail")):
                        wrong.append((path, answer.status_code, answer.text))
                    continue
                if n % 2:
                    answer = http.post("/v1/heads/colours/predict", content=file.read_bytes(), headers=JPEG)
                else:
                    answer = http.post("/v1/heads/colours/predict",
                                       files=[("file", (file.name, file.read_bytes(), "image/jpeg"))])
                statuses.append(answer.status_code)
                result = answer.json()["results"][0] if answer.status_code == 200 else None
                if result is None or not (matches(result, old[file.name], classes)
                                          or matches(result, new[file.name], classes)):
                    wrong.append((file.name, answer.status_code, answer.text[:300]))

    try:
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client, range(CLIENTS)))
        assert len(statuses) == CLIENTS * REQUESTS
        assert not [s for s in statuses if s >= 500]
        assert not wrong, wrong[:5]
        assert httpx.get(url + "/healthz").status_code == 200
        after = httpx.post(url + "/v1/heads/colours/predict", content=files[0].read_bytes(), headers=JPEG).json()
        assert matches(after["results"][0], new[files[0].name], classes)  # the new head serves after the swap
        metrics = httpx.get(url + "/metrics").text
        assert 'featx_serve_errors_total{endpoint="/v1/heads/{name}/predict",status="422"}' in metrics

        # SIGTERM with requests in flight: their bodies are half sent when the signal arrives; all complete.
        release = threading.Event()
        body = files[1].read_bytes()

        def slow_body():
            yield body[:100]
            release.wait(30)
            yield body[100:]

        def in_flight(_):
            with httpx.Client(base_url=url, timeout=60) as http:
                return http.post("/v1/heads/colours/predict", content=slow_body(),
                                 headers={**JPEG, "content-length": str(len(body))})

        with cf.ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(in_flight, i) for i in range(4)]
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            release.set()
            drained = [p.result() for p in pending]
        assert [a.status_code for a in drained] == [200] * 4
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr, stderr


def test_cache_store_survives_kill_9(tmp_path):
    data, store, served = make_head(tmp_path)
    files = image_files(data)
    cache = tmp_path / "cache.h5"
    featx.extract(str(files[0].parent), cache, **EXTRACT)  # one class folder: the other images are new to it
    with featx.open_store(cache) as s:
        known = len(s)
    new = [f for f in files if f.parent != files[0].parent]
    proc, url = start_process([str(served), "--cache", str(cache)])
    try:
        for f in new:
            assert httpx.post(url + "/v1/embed", content=f.read_bytes(), headers=JPEG).json()["results"][0]["cached"] is False
        time.sleep(0.5)  # the segment commits run in the background
    finally:
        proc.kill()  # SIGKILL: no shutdown, no seal
        proc.wait()
    with featx.open_store(cache) as s:  # the old store is intact
        assert len(s) == known
    proc, url = start_process([str(served), "--cache", str(cache)])
    try:  # the committed segments answer after the restart: no forward pass
        answers = [httpx.post(url + "/v1/embed", content=f.read_bytes(), headers=JPEG).json() for f in new]
        assert all(a["results"][0]["cached"] for a in answers)
        assert 'featx_serve_images_total 0.0' in httpx.get(url + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(60)
    with featx.open_store(cache) as s:  # sealed at the clean shutdown
        assert len(s) == known + len(new)
