"""featx serve with a segmentation head (fit-head --task segment): masks through the HTTP API, as run lengths, id
arrays or palette PNGs, equal to what `featx predict` writes; the refusals; and what Ctrl-C says."""
from __future__ import annotations

import io
import signal

import numpy as np
import pytest

pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402

import featx  # noqa: E402
from featx.segment.probe import fit_dense_probe, predict_dense  # noqa: E402
from featx.serve.server import start_process  # noqa: E402
from featx.sources import content_key  # noqa: E402
from maskgen import make_mask_folder  # noqa: E402
from serve_support import make_head, running  # noqa: E402

PNG = "image/png"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(pairs folder, maps store, segmentation head, classification head, the masks `featx predict` writes)."""
    root = tmp_path_factory.mktemp("serve-seg")
    data = make_mask_folder(root / "pairs", splits={"train": 6, "val": 2})
    store = root / "maps.h5"
    featx.extract(data, store, backbone="resnet18", weights="none", taps=["layer2"], pooling="none", image_size=64,
                  workers=0, precision="fp32", device="cpu")
    fit_dense_probe(store, data, root / "people", binary=True, grid="1", pixels_per_image=32)
    _, _, classifier = make_head(root)
    predict_dense(root / "people", data, root / "predicted", store=root / "predicted.h5", workers=0, device="cpu")
    return data, store, root / "people", classifier, root / "predicted"


@pytest.fixture(scope="module")
def client(made):
    with running(heads=[str(made[2]), str(made[3])]) as c:
        yield c


def _image(made, name: str = "p000.png"):
    return made[0] / "val" / "images" / name


def _written(made, name: str = "p000.png") -> np.ndarray:
    """The ids of the mask `featx predict` wrote for a val image."""
    return np.asarray(Image.open(made[4] / "val" / "images" / name))


def _decode(mask: dict) -> np.ndarray:
    return np.repeat(mask["values"], mask["counts"]).reshape(mask["size"])


def test_run_lengths_of_several_images_equal_featx_predict(client, made):
    names = ["p000.png", "p001.png"]
    files = [("file", (n, _image(made, n).read_bytes(), PNG)) for n in names]
    r = client.post("/v1/heads/people/predict", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "segmentation" and body["classes"] == ["background", "foreground"]
    for name, result in zip(names, body["results"]):
        written = _written(made, name)
        assert result["sha256"] == content_key(_image(made, name)) and result["size"] == [40, 48]
        assert np.array_equal(_decode(result["mask"]), written)
        assert result["pixels"] == {c: int((written == i).sum()) for i, c in enumerate(body["classes"])
                                    if (written == i).any()}
    again = client.post("/v1/heads/people/predict", files=files[:1]).json()["results"][0]
    assert again["cached"] is True and again["mask"] == body["results"][0]["mask"]


def test_array_and_png_answers(client, made):
    image, written = _image(made).read_bytes(), _written(made)
    r = client.post("/v1/heads/people/predict?mask=array", content=image, headers={"content-type": PNG})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.asarray(r.json()["results"][0]["mask"]), written)
    for query, headers in (("?mask=png", {}), ("", {"accept": PNG})):
        r = client.post(f"/v1/heads/people/predict{query}", content=image, headers={"content-type": PNG, **headers})
        assert r.status_code == 200 and r.headers["content-type"] == PNG
        assert r.headers["x-featx-sha256"] == content_key(image) and r.headers["x-featx-cached"] in ("true", "false")
        answer = Image.open(io.BytesIO(r.content))
        assert answer.mode == "P" and answer.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert np.array_equal(np.asarray(answer), written)


def test_the_head_is_listed_with_its_mask_classes(client):
    heads = {h["name"]: h for h in client.get("/v1/heads").json()["heads"]}
    assert heads["people"]["task"] == "segmentation" and heads["people"]["classes"] == ["background", "foreground"]


def test_client_mistakes_are_one_line_4xx(client, made):
    image = _image(made).read_bytes()
    two = [("file", ("a.png", image, PNG)), ("file", ("b.png", image, PNG))]
    for args, status, needle in (
        (dict(url="/v1/heads/people/predict?mask=png", files=two), 422, "a PNG answer holds one mask"),
        (dict(url="/v1/heads/people/predict?mask=jpeg", files=two), 422, "mask: Input should be 'rle', 'array' or 'png'"),
        (dict(url="/v1/heads/people/predict?top_k=2", files=two), 422, "it answers masks, not classes"),
        (dict(url="/v1/heads/people/predict", json={"embeddings": [[0.0] * 128]}), 422, "send images"),
        (dict(url="/v1/heads/people/predict", content=b"not an image", headers={"content-type": PNG}), 422,
         "not a recognised image format"),
        (dict(url="/v1/heads/colours/predict?mask=png", files=two), 422, "'colours' is not a segmentation head"),
    ):
        r = client.post(**args)
        assert r.status_code == status, r.text
        assert needle in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_array_answers_are_for_small_images_only(client, tmp_path):
    big = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), dtype=np.uint8)).save(big, format="PNG")
    r = client.post("/v1/heads/people/predict?mask=array", content=big.getvalue(), headers={"content-type": PNG})
    assert r.status_code == 422 and "90000 pixels, over the 65536 of mask=array" in r.json()["detail"]
    r = client.post("/v1/heads/people/predict", content=big.getvalue(), headers={"content-type": PNG})
    assert r.status_code == 200 and r.json()["results"][0]["size"] == [300, 300]


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_says_what_it_kept(made, tmp_path):
    _, store, head, _, _ = made
    cache = tmp_path / "cache.h5"
    for args, said in ((["--cache", cache], f"the new embeddings are sealed into {cache}"), ([], "nothing to resume")):
        proc, url = start_process([str(head), *map(str, args)])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        lines = proc.stderr.read().strip().splitlines()
        assert lines == [f"featx serve: stopped after answering the requests in flight ({said})"]


def test_a_finetune_run_folder_is_refused_at_start_up(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.pt").write_bytes(b"weights")
    out = cli("serve", run, "--port", "0")
    assert out.exit_code == 2 and out.stderr.count("\n") == 1
    assert f"HEAD_DIR {run}: a featx finetune run, not a head folder" in out.stderr
