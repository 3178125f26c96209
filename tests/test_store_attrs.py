"""A self-describing store: every dataset says what it holds in its attributes, for readers that know no featx."""
from __future__ import annotations

import h5py
import numpy as np

from featx import extract
from featx.store import SCHEMA_VERSION, open_store
from test_store_readers import make_store


def attrs(h5, name) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in h5[name].attrs.items()}


def test_write_store_describes_every_dataset(tmp_path):
    make_store(tmp_path / "s.h5", root=str(tmp_path), dtype=np.float16)
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        assert h5.attrs["featx_schema"] == SCHEMA_VERSION == 1  # additive: the schema did not change
        assert "row i of every dataset" in h5.attrs["description"]
        label = attrs(h5, "items/label")
        assert label["unlabelled"] == -1 and label["classes"] == "/classes"
        assert label["class_names"] == ["ants", "bees", "wasps"]
        assert "-1 = unlabelled" in label["description"]
        for name in ("items/key", "items/path", "items/split", "items/root", "roots", "classes", "failed/path",
                     "failed/reason", "failed/root"):
            assert h5[name].attrs["description"], name
        pooled = attrs(h5, "features/avgpool")
        assert pooled["tap"] == "avgpool" and pooled["backbone"] == "resnet18" and pooled["pooling"] == "avg"
        assert pooled["axes"] == "image, feature" and pooled["dtype_note"].startswith("float16 on disk")
        assert attrs(h5, "features/layer4")["axes"] == "image, channel, height, width"
    with open_store(tmp_path / "s.h5") as st:  # featx reads it as before
        assert st.schema == 1 and st.taps == ["avgpool", "layer4"]


def test_a_sealed_extract_is_described_and_so_is_its_next_seal(tmp_path, image_folders):
    data = image_folders("data", per_class=2)
    fast = dict(backbone="resnet18", weights="none", image_size=32, workers=0, taps=["avgpool"], progress=False)
    extract(data, tmp_path / "s.h5", **fast)
    image_folders("data", per_class=3, seed=0)  # one new image per class: the store is sealed again
    extract(data, tmp_path / "s.h5", **fast)
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        assert h5["items/key"].shape == (6,)
        assert attrs(h5, "items/label")["class_names"] == ["ants", "bees"]
        ds = attrs(h5, "features/avgpool")
        assert ds["weights"] == "none" and ds["tap"] == "avgpool" and "resnet18" in ds["description"]
        assert ds["dtype_note"].startswith("float32")


def test_many_class_names_stay_in_classes_only(tmp_path):
    from featx.store import write_store

    classes = [f"class number {i} with a long name" for i in range(2000)]
    write_store(tmp_path / "s.h5", config={"taps": ["x"]}, keys=["0" * 64], paths=["a.png"], labels=[1999],
                classes=classes, features={"x": np.zeros((1, 2), np.float32)})
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        assert "class_names" not in h5["items/label"].attrs and h5["items/label"].attrs["classes"] == "/classes"
        assert h5["classes"].shape == (2000,)
