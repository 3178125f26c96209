"""Hostile files through `featx extract` end to end: an ImageFolder of valid-but-odd images, broken files,
non-images, hidden files, special files and symlink loops.

Every valid image becomes a row (pixel-identical files in other formats or modes get identical embeddings),
every broken one is listed in /failed with its reason, nothing else is picked up, nothing crashes or hangs, and
the peak memory of the run stays within a fixed margin of a plain run's.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.sources import DEFAULT_MAX_PIXELS
from featx.store import open_store

from .helpers import FAST, featx, write_pngs

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

# A decoded 30000 x 30000 claim would need 900 MB even as 8-bit gray; the whole run must stay well below that.
RSS_MARGIN_MB = 400


def _png_claiming(width: int, height: int, mode_byte: int = 0) -> bytes:
    """A tiny PNG with valid CRCs whose IHDR claims width x height pixels, with one small IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


class Corpus:
    """Builds the tree and remembers what each file is expected to become."""

    def __init__(self, root: Path):
        self.root = root
        self.valid: list[str] = []  # must be rows
        self.broken: dict[str, str] = {}  # must be in /failed, reason starts with this
        self.ignored: list[str] = []  # must be neither
        self.same: list[tuple[str, str]] = []  # pairs of valid files with pixel-identical content
        self.rng = np.random.default_rng(42)

    def noise(self, w: int, h: int, channels: int = 3) -> np.ndarray:
        shape = (h, w, channels) if channels > 1 else (h, w)
        return self.rng.integers(0, 256, shape, dtype=np.uint8)

    def put(self, rel: str, data: bytes | Image.Image, kind: str = "valid", reason: str = "", **save) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Image.Image):
            data.save(path, **save)
        else:
            path.write_bytes(data)
        if kind == "valid":
            self.valid.append(rel)
        elif kind == "broken":
            self.broken[rel] = reason
        else:
            self.ignored.append(rel)
        return rel


def build(root: Path) -> Corpus:
    c = Corpus(root)
    base = Image.fromarray(c.noise(40, 30))
    ref = c.put("a/base.png", base)
    # same pixels in every lossless container, and an upper-case extension
    for rel, fmt, kwargs in [("a/bitmap.bmp", "BMP", {}), ("a/lossless.webp", "WEBP", {"lossless": True}),
                             ("a/scan.tiff", "TIFF", {}), ("a/UPPER.PNG", "PNG", {"compress_level": 9})]:
        c.same.append((ref, c.put(rel, _bytes(base, fmt, **kwargs))))
    c.put("a/UPPER.JPG", _bytes(base, "JPEG", quality=90))
    c.put("a/progressive.jpeg", _bytes(base, "JPEG", progressive=True))
    # extreme sizes
    c.put("a/one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    c.put("a/tall_3x900.png", Image.fromarray(c.noise(3, 900)))
    c.put("a/wide_900x3.png", Image.fromarray(c.noise(900, 3)))
    # modes: 16-bit gray, palette, transparency, bilevel, float, CMYK
    gray16 = c.rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    c.same.append((
        c.put("a/gray16.png", Image.fromarray(gray16)),
        c.put("a/gray16_as_8bit.png", Image.fromarray((gray16 >> 8).astype(np.uint8))),
    ))
    palette = base.quantize(colors=16)
    c.same.append((c.put("a/palette.png", palette), c.put("a/palette_as_rgb.png", palette.convert("RGB"))))
    c.put("a/palette_transparent.gif", palette, transparency=0)
    rgba = Image.fromarray(np.dstack([c.noise(40, 30), c.noise(40, 30, 1)]), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    c.same.append((c.put("a/rgba.png", rgba), c.put("a/rgba_on_white.png", Image.alpha_composite(white, rgba).convert("RGB"))))
    c.put("a/gray_alpha.png", Image.fromarray(c.noise(20, 20, 1)).convert("LA"))
    c.put("a/bilevel.png", Image.fromarray(c.noise(20, 20, 1)).convert("1"))
    c.put("a/float.tiff", Image.fromarray(c.rng.uniform(0, 255, (20, 20)).astype(np.float32), "F"))
    c.put("a/cmyk.jpg", Image.fromarray(c.noise(24, 24)).convert("CMYK"), quality=90)
    # animation (first frame) and EXIF orientation (applied before the crop)
    frames = [Image.fromarray(c.noise(16, 16)) for _ in range(3)]
    c.put("a/animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=40, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    c.same.append((c.put("a/exif_rotated.png", base, exif=exif),
                   c.put("a/exif_upright.png", base.transpose(Image.Transpose.ROTATE_270))))
    # names: non-ASCII, spaces, a PNG named .jpg, nesting; byte-identical duplicates (also across classes)
    c.put("b/café été 日本.png", Image.fromarray(c.noise(20, 20)))
    c.put("b/with space.png", Image.fromarray(c.noise(20, 20)))
    c.put("b/png_named.jpg", _bytes(Image.fromarray(c.noise(20, 20)), "PNG"))
    c.put("b/nested/deeper/x.png", Image.fromarray(c.noise(20, 20)))
    dup = _bytes(Image.fromarray(c.noise(20, 20)), "PNG")
    for rel in ("b/dup1.png", "b/dup2.png", "a/dup3.png"):
        c.put(rel, dup)
    c.same += [("b/dup1.png", "b/dup2.png"), ("b/dup1.png", "a/dup3.png")]
    os.symlink("../b/with space.png", root / "a/link_to_file.png")
    c.valid.append("a/link_to_file.png")
    c.same.append(("b/with space.png", "a/link_to_file.png"))
    c.put("loose at root.png", Image.fromarray(c.noise(20, 20)))  # unlabelled item next to the class folders

    # broken files
    jpeg = _bytes(Image.fromarray(c.noise(64, 64)), "JPEG")
    png = _bytes(Image.fromarray(c.noise(64, 64)), "PNG")
    c.put("b/empty.jpg", b"", "broken", "empty file (0 bytes)")
    c.put("b/truncated.jpg", jpeg[: len(jpeg) // 2], "broken", "truncated or corrupt image data")
    c.put("b/truncated.png", png[: len(png) // 2], "broken", "truncated or corrupt image data")
    c.put("b/text.jpg", b"this is not an image\n" * 20, "broken", "not a recognised image format")
    c.put("b/random.png", np.random.default_rng(7).bytes(5000), "broken", "not a recognised image format")
    c.put("b/png_header_only.png", b"\x89PNG\r\n\x1a\n", "broken", "truncated or corrupt image data")
    c.put("b/gif_header_only.gif", b"GIF89a", "broken", "truncated or corrupt image data")
    c.put("b/bomb_30000x30000.png", _png_claiming(30000, 30000), "broken", "image too large: 30000 x 30000")
    c.put("a/claims_12000x12000.png", _png_claiming(12000, 12000), "broken", "truncated or corrupt image data")
    if os.geteuid() != 0:  # root reads anything
        c.put("b/unreadable.png", png, "broken", "cannot read file")
        os.chmod(root / "b/unreadable.png", 0)

    # links to files that lead nowhere: failures, like any file that cannot be read
    os.symlink("missing.jpg", root / "b/dangling.jpg")
    c.broken["b/dangling.jpg"] = "cannot read file: No such file or directory"
    os.symlink("self.jpg", root / "b/self.jpg")
    c.broken["b/self.jpg"] = "cannot read file: Too many levels of symbolic links"

    # neither rows nor failures: non-images, hidden files and folders, special files, folder links that loop
    c.put("a/README.txt", b"notes\n", "ignored")
    c.put("a/labels.json", b"{}", "ignored")
    c.put("a/no_extension", png, "ignored")
    c.put("b/.DS_Store", b"\0\0\0\1Bud1", "ignored")
    c.put("a/.hidden.png", png, "ignored")
    c.put("a/._resource_fork.jpg", b"\0\5\26\7", "ignored")
    c.put(".git/objects/x.png", png, "ignored")
    c.put("b/.thumbnails/t.png", png, "ignored")
    os.mkfifo(root / "a/fifo.jpg")  # opening it would block forever
    c.ignored.append("a/fifo.jpg")
    os.symlink("..", root / "a/loop_to_root")
    os.symlink(".", root / "b/loop_to_self")
    return c


def test_hostile_tree_end_to_end(tmp_path):
    plain = tmp_path / "plain"
    write_pngs(plain, 8, size=24)
    baseline = featx("extract", plain, "-o", tmp_path / "plain.h5", *FAST, "--batch-size", "8")
    assert baseline.returncode == 0, baseline

    corpus = build(tmp_path / "data")
    store = tmp_path / "hostile.h5"
    run = featx("extract", corpus.root, "-o", store, *FAST, "--batch-size", "8", "--json", timeout=180)
    assert run.returncode == 0, run
    assert "Traceback" not in run.stderr, run

    with open_store(store) as st:
        paths = list(st.paths)
        failed = dict(st.failed)
        assert sorted(paths) == sorted(corpus.valid), set(paths) ^ set(corpus.valid)
        assert len(paths) == len(set(paths))
        assert sorted(failed) == sorted(corpus.broken), set(failed) ^ set(corpus.broken)
        for rel, reason in corpus.broken.items():
            assert failed[rel].startswith(reason) and "\n" not in failed[rel], (rel, failed[rel])
        for rel in corpus.ignored:
            assert rel not in paths and rel not in failed, rel
        assert str(DEFAULT_MAX_PIXELS) in failed["b/bomb_30000x30000.png"]

        index = {p: i for i, p in enumerate(paths)}
        features = st.features(st.taps[0])
        for a, b in corpus.same:
            np.testing.assert_allclose(features[index[a]], features[index[b]], rtol=1e-5, atol=1e-6, err_msg=f"{a} vs {b}")
        keys = dict(zip(paths, st.keys))
        assert keys["b/dup1.png"] == keys["b/dup2.png"] == keys["a/dup3.png"]
        assert st.labels[index["loose at root.png"]] == -1 and st.classes == ["a", "b"]
        n_rows, n_failed = len(st), len(st.failed)

    # duplicates (and the files reached twice through the link) are computed once
    result = json.loads(run.stdout)
    assert result["items"] == n_rows and result["failed"] == n_failed
    assert result["computed"] == len(set(keys.values()))

    assert run.peak_rss_mb < baseline.peak_rss_mb + RSS_MARGIN_MB, (run.peak_rss_mb, baseline.peak_rss_mb)
    print(f"\nhostile tree: {len(corpus.valid)} valid, {len(corpus.broken)} broken, {len(corpus.ignored)} ignored "
          f"(+2 looping folder links); peak RSS {run.peak_rss_mb:.0f} MB vs plain {baseline.peak_rss_mb:.0f} MB")

    # a rerun reuses everything and reports the same failures again
    again = featx("extract", corpus.root, "-o", store, *FAST, "--batch-size", "8", "--json")
    assert again.returncode == 0, again
    again_result = json.loads(again.stdout)
    assert again_result["computed"] == 0 and again_result["failed"] == n_failed
    shutil.rmtree(tmp_path / "data")
