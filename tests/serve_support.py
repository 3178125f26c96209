"""Shared by the serve tests: a tiny image folder, its store and a fitted head (random-init resnet18, 32 px)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from imagegen import make_image_folder

EXTRACT = dict(backbone="resnet18", weights="none", image_size=32, resize=32, taps=["layer3", "avgpool"],
               precision="fp32", workers=0)


def make_head(root: Path, name: str = "colours", classes=("red", "green", "blue"), C: str = "1", seed: int = 0):
    """(image folder, store, head folder) under `root`: `featx extract` then `featx fit-head` with a fixed C."""
    import featx

    data = make_image_folder(root / f"{name}-data", classes=classes, per_class=6, size=(40, 36), ext="jpg", seed=seed)
    store = root / f"{name}.h5"
    featx.extract(str(data), store, **EXTRACT)
    featx.fit_head(store, "avgpool", root / name, grid=C, val_split=0, plots=False, overwrite=True, n_jobs=1)
    return data, store, root / name


def image_files(data: Path) -> list[Path]:
    return sorted(p for p in Path(data).rglob("*.jpg"))


@contextlib.contextmanager
def running(**options):
    """A TestClient on a Service with these ServeOptions, once its extractors are loaded (`.service` is the
    Service)."""
    from fastapi.testclient import TestClient

    from featx.serve.app import create_app
    from featx.serve.options import ServeOptions
    from featx.serve.service import Service

    service = Service(ServeOptions(**options).checked())
    with TestClient(create_app(service)) as client:
        for _ in range(600):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.02)
        client.service = service
        yield client
