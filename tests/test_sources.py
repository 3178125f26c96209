"""featx.sources: finding images and labels, robust decoding, content keys, the digits dataset, hold-out splits."""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from featx.errors import FeatxError
from featx.sources import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DecodeError,
    content_key,
    content_keys,
    decode_image,
    load_source,
    stratified_holdout,
    unreadable_reason,
)
from imagegen import make_image, make_image_folder, png_claiming

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def rgb_at(img: Image.Image, xy=(0, 0)) -> np.ndarray:
    """One pixel of an RGB image as an int array."""
    return np.asarray(img, dtype=np.int64)[xy[1], xy[0]]


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    """Save `img` to `path` (format from `format=` or the extension) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def write(path: Path, data: bytes) -> Path:
    """Write raw bytes to `path` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def relpaths(source) -> list[str]:
    return [item.relpath for item in source.items]


# --------------------------------------------------------------------------------------------------------------------
# folders


def test_imagefolder_classes_labels_order_and_description(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("bees", "ants"), per_class=3)
    make_image(root / "ants" / "nested" / "deeper" / "x.png", 0, 99)
    source = load_source(str(root))
    assert source.root == str(root)
    assert source.classes == ["ants", "bees"]
    assert source.task == "classification"
    assert relpaths(source) == [
        "ants/ants_000.png", "ants/ants_001.png", "ants/ants_002.png", "ants/nested/deeper/x.png",
        "bees/bees_000.png", "bees/bees_001.png", "bees/bees_002.png",
    ]
    assert [item.label for item in source.items] == [0, 0, 0, 0, 1, 1, 1]
    first = source.items[0]
    assert first.path == str(root / "ants" / "ants_000.png") and os.path.isabs(first.path)
    assert first.split == "" and math.isnan(first.target)
    assert source.description == f"ImageFolder {root}/ (2 classes, 7 images)"


def test_items_are_frozen(tmp_path):
    source = load_source(make_image_folder(tmp_path, per_class=1))
    with pytest.raises(AttributeError):
        source.items[0].label = 3


def test_split_layout_records_splits_and_unions_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("cat", "dog"), splits={"train": 3, "val": 2})
    make_image(root / "train" / "owl" / "o.png", 2, 7)  # a class present only in train
    source = load_source(root)
    assert source.classes == ["cat", "dog", "owl"]
    assert [item.split for item in source.items] == ["train"] * 7 + ["val"] * 4
    assert relpaths(source)[6] == "train/owl/o.png" and source.items[6].label == 2
    assert source.description == f"ImageFolder {root}/ (3 classes, 11 images, splits train 7 / val 4)"


def test_split_folder_of_loose_images_is_unlabelled(tmp_path):
    root = make_image_folder(tmp_path, splits={"train": 2})
    make_image(root / "test" / "a.png", 0, 1)
    source = load_source(root)
    test_items = [item for item in source.items if item.split == "test"]
    assert [(i.relpath, i.label) for i in test_items] == [("test/a.png", -1)]
    assert "1 unlabelled" in source.description and "splits train 4 / test 1" in source.description


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"img{i}.jpg", i, i)
    source = load_source(tmp_path)
    assert source.task == "unlabelled" and source.classes == []
    assert relpaths(source) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert {item.label for item in source.items} == {-1}
    assert source.description.endswith("(3 unlabelled images)")


def test_hidden_non_image_and_odd_names(tmp_path):
    root = make_image_folder(tmp_path, per_class=1)
    make_image(root / ".hidden_class" / "a.png", 0, 1)
    make_image(root / "ants" / ".secret.png", 0, 2)
    make_image(root / "ants" / ".cache" / "b.png", 0, 3)
    write(root / "ants" / "notes.txt", b"not an image")
    write(root / "ants" / "Thumbs.db", b"\0\1")
    make_image(root / "ants" / "UPPER.JPEG", 0, 4, fmt="JPEG")
    make_image(root / "bees" / "émile café.png", 1, 5)
    source = load_source(root)
    assert source.classes == ["ants", "bees"]
    assert relpaths(source) == ["ants/UPPER.JPEG", "ants/ants_000.png", "bees/bees_000.png", "bees/émile café.png"]
    assert decode_image(source.items[-1].path).size == (32, 24)


def test_symlinks_followed_without_looping(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2)
    outside = make_image_folder(tmp_path / "elsewhere", classes=("extra",), per_class=1)
    os.symlink(root / "ants", root / "ants" / "loop")  # a folder containing itself
    os.symlink(root, root / "bees" / "up")  # back to the root
    os.symlink(outside / "extra", root / "bees" / "linked")  # a real folder elsewhere
    os.symlink(root / "ants" / "ants_000.png", root / "bees" / "file_link.png")
    source = load_source(root)
    assert relpaths(source) == [
        "ants/ants_000.png", "ants/ants_001.png",
        "bees/bees_000.png", "bees/bees_001.png", "bees/file_link.png", "bees/linked/extra_000.png",
    ]


def test_links_that_loop_or_dangle_are_items_that_fail_to_read(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=1)
    os.symlink("self.png", root / "bees" / "self.png")  # a link to itself
    os.symlink("b.jpg", root / "bees" / "a.jpg")  # two links to each other
    os.symlink("a.jpg", root / "bees" / "b.jpg")
    os.symlink("missing.png", root / "bees" / "dangling.png")
    os.symlink("loop2", root / "ants" / "loop1")  # folder-like names that loop: not images, left out
    os.symlink("loop1", root / "ants" / "loop2")
    source = load_source(root)
    assert relpaths(source) == ["ants/ants_000.png", "bees/a.jpg", "bees/b.jpg", "bees/bees_000.png",
                                "bees/dangling.png", "bees/self.png"]
    reasons = {item.relpath: unreadable_reason(item.path) for item in source.items}
    assert reasons["bees/self.png"] == reasons["bees/a.jpg"] == "cannot read file: Too many levels of symbolic links"
    assert reasons["bees/dangling.png"] == "cannot read file: No such file or directory"
    assert content_keys([item.path for item in source.items])[1:3] == [None, None]


def test_unreadable_subfolder_is_recorded_and_left_out(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", classes=("ants", "bees", "wasps"), per_class=1)
    os.mkdir(root / "ants" / "private")
    locked = {str(root / "bees"), str(root / "ants" / "private")}
    scandir = os.scandir

    def refusing(path="."):  # what chmod 000 does for anyone but root
        if str(path) in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    source = load_source(root)
    assert relpaths(source) == ["ants/ants_000.png", "wasps/wasps_000.png"] and source.classes == ["ants", "wasps"]
    assert source.failed == [("ants/private", "cannot read folder: Permission denied"),
                             ("bees", "cannot read folder: Permission denied")]
    assert source.description.endswith("(2 classes, 2 images, 2 unreadable folders left out)")
    locked.add(str(root))
    with pytest.raises(FeatxError, match=rf"^cannot read folder {root}: Permission denied$"):
        load_source(root)


def test_every_image_extension_in_any_case_is_found(tmp_path):
    for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)):
        write(tmp_path / f"f{i}{ext.upper() if i % 2 else ext}", b"x")
    assert len(load_source(tmp_path).items) == len(IMAGE_EXTENSIONS) == 10


def test_folder_without_images(tmp_path):
    write(tmp_path / "cats" / "readme.md", b"hi")
    with pytest.raises(FeatxError, match=rf"^no images found in {tmp_path}: expected ImageFolder root/<class>/<image>"):
        load_source(tmp_path)


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(FeatxError, match=r"nope does not exist \(expected a folder, a \.csv"):
        load_source(tmp_path / "nope")
    with pytest.raises(FeatxError, match=r"data\.json: unsupported file type \.json \(expected a folder"):
        load_source(write(tmp_path / "data.json", b"{}"))


# --------------------------------------------------------------------------------------------------------------------
# CSV and text lists


@pytest.fixture
def three_images(images) -> list[Path]:
    return images("img", 3)


@pytest.mark.parametrize("header", ["", "path,label\n", "file,label\n"])
def test_csv_int_labels_sorted_numerically(tmp_path, three_images, header):
    csv = write(tmp_path / "labels.csv", (header + "img/0.png,10\nimg/1.png,2\nimg/2.png,02\n").encode())
    source = load_source(csv)
    assert source.task == "classification" and source.classes == ["2", "10"]
    assert [(i.relpath, i.label) for i in source.items] == [("img/1.png", 0), ("img/2.png", 0), ("img/0.png", 1)]
    assert source.root == str(tmp_path) and source.items[0].path == str(three_images[1])
    assert source.description == f"CSV {csv} (2 classes, 3 images)"


def test_csv_string_labels_and_split_column(tmp_path, three_images):
    text = "path,label,split\nimg/0.png,zebra,train\nimg/1.png,ant,val\nimg/2.png,zebra,train\n"
    source = load_source(write(tmp_path / "s.csv", text.encode()))
    assert source.classes == ["ant", "zebra"]
    assert [(i.relpath, i.label, i.split) for i in source.items] == [
        ("img/0.png", 1, "train"), ("img/2.png", 1, "train"), ("img/1.png", 0, "val"),
    ]
    assert source.description.endswith("(2 classes, 3 images, splits train 2 / val 1)")


def test_csv_float_labels_are_regression(tmp_path, three_images):
    source = load_source(write(tmp_path / "r.csv", b"path,target\nimg/0.png,1.5\nimg/1.png,3\nimg/2.png,-2e-1\n"))
    assert source.task == "regression" and source.classes == []
    assert [i.target for i in source.items] == [1.5, 3.0, -0.2]
    assert {i.label for i in source.items} == {-1}
    assert "regression, 3 images" in source.description


def test_csv_without_labels_is_unlabelled_and_absolute_paths(tmp_path, three_images):
    lists = tmp_path / "lists"
    lists.mkdir()
    source = load_source(write(lists / "u.csv", f"{three_images[0]},\n../img/1.png\n".encode()))
    assert source.task == "unlabelled" and source.root == str(lists)
    assert relpaths(source) == [three_images[0].as_posix(), three_images[1].as_posix()]


def test_csv_missing_files_are_items_that_fail_to_read(tmp_path, three_images):
    csv = write(tmp_path / "m.csv", b"path,label\nimg/0.png,a\n\nimg/gone.png,b\nimg/lost.png,b\n")
    source = load_source(csv)
    assert relpaths(source) == ["img/0.png", "img/gone.png", "img/lost.png"]
    assert source.description == f"CSV {csv} (2 classes, 3 images, 2 not found)"
    assert unreadable_reason(source.items[1].path) == "cannot read file: No such file or directory"


def test_csv_with_no_file_there_names_the_first_line_and_where_it_looked(tmp_path):
    csv = write(tmp_path / "lists" / "m.csv", b"path,label\nimg/0.png,a\nimg/1.png,b\n")
    with pytest.raises(FeatxError) as err:
        load_source(csv)
    assert str(err.value) == (
        f"{csv} line 2: image img/0.png not found (looked for {tmp_path / 'lists' / 'img' / '0.png'}); none of its 2 "
        "images is there (relative paths start from the folder of m.csv)"
    )


@pytest.mark.parametrize("header, row", [
    ("filepath,class", "{path},zebra"),
    ("image,label,split", "{path},zebra,val"),
    ("File_Path , Category", "{path},zebra"),
    ("id,class_name,img_path,width", "7,zebra,{path},32"),  # named columns in any order, others ignored
    ("label,split,path", "zebra,val,{path}"),
])
def test_csv_header_names_the_columns(tmp_path, three_images, header, row):
    text = "\n".join([header] + [row.format(path=f"img/{i}.png") for i in range(3)]) + "\n"
    source = load_source(write(tmp_path / "h.csv", text.encode()))
    assert relpaths(source) == ["img/0.png", "img/1.png", "img/2.png"]
    assert source.classes == ["zebra"] and {i.label for i in source.items} == {0}
    assert {i.split for i in source.items} == ({"val"} if "split" in header else {""})


def test_csv_first_row_naming_an_existing_file_is_data(tmp_path):
    make_image(tmp_path / "image", 0, 0, fmt="PNG")  # a file literally named like a header column
    make_image(tmp_path / "b.png", 1, 1)
    source = load_source(write(tmp_path / "d.csv", b"image,label\nb.png,label\n"))
    assert relpaths(source) == ["b.png", "image"] and source.classes == ["label"]


@pytest.mark.parametrize(
    "text, message",
    [
        (b"", "is empty: expected rows of path,label[,split]"),
        (b"path,label\n\n", "is empty: expected rows of path,label[,split]"),
        (b"img/0.png,a\nimg/1.png,a,train,x\n", "line 2: malformed row 'img/1.png,a,train,x': expected path,label"),
        (b"img/0.png,a,training\n", "line 1: split 'training': expected one of train, val, test or empty"),
        (b"\xff\xfe\x00garbage,1\n", "is not a UTF-8 text file"),
    ],
)
def test_csv_errors(tmp_path, three_images, text, message):
    csv = write(tmp_path / "bad.csv", text)
    with pytest.raises(FeatxError) as err:
        load_source(csv)
    assert str(err.value).startswith(str(csv)) and message in str(err.value) and "\n" not in str(err.value)


def test_txt_list(tmp_path, three_images):
    source = load_source(write(tmp_path / "files.txt", b"# my images\nimg/2.png\n\n  img/0.png  \n"))
    assert source.task == "unlabelled" and relpaths(source) == ["img/0.png", "img/2.png"]
    assert source.description == f"list {tmp_path / 'files.txt'} (2 unlabelled images)"
    with_missing = load_source(write(tmp_path / "files2.txt", b"img/0.png\nnothere.png\n"))
    assert relpaths(with_missing) == ["img/0.png", "nothere.png"]
    assert with_missing.description.endswith("(2 unlabelled images, 1 not found)")
    with pytest.raises(FeatxError, match=r"files3\.txt line 1: image nothere\.png not found"):
        load_source(write(tmp_path / "files3.txt", b"nothere.png\n"))


def test_special_files_listed_are_refused_without_blocking(tmp_path, three_images):
    os.mkfifo(tmp_path / "fifo.png")  # opening it for reading would wait for a writer forever
    source = load_source(write(tmp_path / "s.txt", b"img/0.png\nfifo.png\n/dev/zero\n"))
    assert relpaths(source) == ["/dev/zero", "fifo.png", "img/0.png"]
    for item in source.items[:2]:
        assert unreadable_reason(item.path) == "cannot read file: not a regular file"
        with pytest.raises(OSError):
            content_key(item.path)
        with pytest.raises(DecodeError, match="^cannot read file: not a regular file$"):
            decode_image(item.path)


# --------------------------------------------------------------------------------------------------------------------
# digits


def test_digits_materialized_once_as_split_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    source = load_source("digits")
    assert len(source.items) == 1797 and source.classes == [str(d) for d in range(10)]
    assert source.root == str(tmp_path / "digits-v1")
    splits = [item.split for item in source.items]
    assert splits.count("val") == 359 and splits.count("train") == 1438
    indices = [int(Path(item.relpath).stem) for item in source.items]
    assert sorted(indices) == list(range(1797))
    assert all((index % 5 == 4) == (item.split == "val") for index, item in zip(indices, source.items))
    digits = load_digits()
    assert [int(source.classes[item.label]) for item in source.items] == digits.target[indices].tolist()
    img = Image.open(tmp_path / "digits-v1" / "train" / "0" / "0.png")
    assert img.mode == "L" and img.size == (32, 32)
    expected = np.round(digits.images[0] * 255 / 16).astype(np.uint8)
    assert (np.asarray(img) == np.kron(expected, np.ones((4, 4), dtype=np.uint8))).all()  # nearest 4x upscaling
    stamp = (tmp_path / "digits-v1" / "val" / "4" / "4.png").stat().st_mtime_ns
    again = load_source("digits")
    assert (tmp_path / "digits-v1" / "val" / "4" / "4.png").stat().st_mtime_ns == stamp
    assert relpaths(again) == relpaths(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-v1"]  # no partial folder left behind


def test_digits_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    calls = []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return original(self, fp, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(FeatxError, match=rf"cannot write the digits dataset under {tmp_path}: .*No space left"):
        load_source("digits")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_digits_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    real_rename = os.rename

    def another_process_wins(src, dst):
        shutil.copytree(src, dst)  # the other process renamed its complete copy into place first
        (Path(dst) / "winner").touch()
        real_rename(src, dst)  # now fails: the destination exists and is not empty

    monkeypatch.setattr(os, "rename", another_process_wins)
    source = load_source("digits")
    assert len(source.items) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-v1"] and (tmp_path / "digits-v1" / "winner").exists()


# --------------------------------------------------------------------------------------------------------------------
# content keys


def test_content_key_is_sha256_of_bytes(tmp_path):
    data = np.random.default_rng(0).bytes(2 * 1024 * 1024 + 17)  # spans several 1 MiB blocks
    path = write(tmp_path / "big.bin", data)
    assert content_key(path) == hashlib.sha256(data).hexdigest()
    assert content_key(write(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(OSError):
        content_key(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------------
# decoding: images that must decode


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_decodes_common_formats(tmp_path):
    red = Image.new("RGB", (20, 10), RED)
    for ext in ("png", "bmp", "webp", "tiff", "ppm", "gif"):
        img = decode_image(save(red, tmp_path / f"red.{ext}", **({"lossless": True} if ext == "webp" else {})))
        assert img.mode == "RGB" and img.size == (20, 10), ext
        assert np.abs(rgb_at(img, (5, 5)) - RED).max() <= 2, ext


def test_png_named_jpg_and_one_pixel(tmp_path):
    img = decode_image(save(Image.new("RGB", (1, 1), BLUE), tmp_path / "liar.jpg", format="PNG"))
    assert img.size == (1, 1) and tuple(rgb_at(img)) == BLUE


def test_16bit_gray_png_scaled_to_8bit(tmp_path):
    values = np.array([[0, 0x8000, 0xFFFF, 0x01FF]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    img = decode_image(path)
    assert img.mode == "RGB" and np.asarray(img)[0].tolist() == [[0] * 3, [128] * 3, [255] * 3, [1] * 3]


def test_32bit_int_and_float_gray(tmp_path):
    ints = save(Image.fromarray(np.array([[40000, -5, 70000]], dtype=np.int32)), tmp_path / "i.tiff")
    assert Image.open(ints).mode == "I"
    assert np.asarray(decode_image(ints))[0, :, 0].tolist() == [156, 0, 255]
    floats = save(Image.fromarray(np.array([[100.7, 300.0, -4.0]], dtype=np.float32)), tmp_path / "f.tiff")
    assert Image.open(floats).mode == "F"
    assert np.asarray(decode_image(floats))[0, :, 0].tolist() == [100, 255, 0]


def test_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    img = decode_image(save(rgba, tmp_path / "a.png"))
    assert [tuple(rgb_at(img, (x, 0))) for x in (0, 1)] == [RED, WHITE]
    assert abs(int(rgb_at(img, (2, 0))[0]) - 127) <= 1  # half-transparent black over white

    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    img = decode_image(save(palette, tmp_path / "p.png", transparency=1))
    assert [tuple(rgb_at(img, (x, 0))) for x in (0, 1)] == [RED, WHITE]

    la = Image.new("LA", (1, 1), (0, 0))
    assert tuple(rgb_at(decode_image(save(la, tmp_path / "la.png")))) == WHITE


def test_gray_bilevel_and_cmyk_to_rgb(tmp_path):
    assert tuple(rgb_at(decode_image(save(Image.new("L", (3, 3), 77), tmp_path / "l.png")))) == (77, 77, 77)
    assert tuple(rgb_at(decode_image(save(Image.new("1", (3, 3), 1), tmp_path / "b.png")))) == WHITE
    cmyk = write(tmp_path / "c.jpg", jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95))
    assert Image.open(cmyk).mode == "CMYK"
    img = decode_image(cmyk)
    assert img.mode == "RGB" and np.abs(rgb_at(img, (8, 8)) - RED).max() <= 8


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    img = decode_image(path)
    assert tuple(rgb_at(img)) == RED
    os.remove(path)  # fully loaded: no lazy reads from the file remain
    assert tuple(rgb_at(img, (7, 7))) == RED


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(write(tmp_path / "rot.jpg", jpeg_bytes(img, exif=exif, quality=95)))
    assert out.size == (20, 40)
    assert np.abs(rgb_at(out, (10, 2)) - BLUE).max() < 40 and np.abs(rgb_at(out, (10, 38)) - RED).max() < 40


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path):
    path = write(tmp_path / "big.jpg", jpeg_bytes(Image.new("RGB", (1000, 800), RED)))
    assert decode_image(path).size == (1000, 800)
    small = decode_image(path, min_size=200)
    assert small.mode == "RGB" and small.size[0] < 1000 and min(small.size) >= 200
    assert decode_image(path, min_size=900).size == (1000, 800)  # never below min_size
    png = save(Image.new("RGB", (1000, 800), RED), tmp_path / "big.png")
    assert decode_image(png, min_size=200).size == (1000, 800)


# --------------------------------------------------------------------------------------------------------------------
# decoding: files that must fail with a clear one-line reason


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = jpeg_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        ("text.jpg", b"hello, I am a text file\n" * 4, "not a recognised image format"),
        ("three-bytes.bmp", b"vm\n", "not a recognised image format"),
        ("random.png", np.random.default_rng(1).bytes(4096), "not a recognised image format"),
        ("header.png", b"\x89PNG\r\n\x1a\n", "truncated or corrupt image data: PNG header"),
        ("cut.jpg", truncated_jpeg(), "truncated or corrupt image data: image file is truncated"),
        (
            "bomb.png",
            png_claiming(30000, 30000),
            f"image too large: 30000 x 30000 = 900000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} "
            "(decompression-bomb guard)",
        ),
    ],
)
def test_broken_files_raise_decode_error(tmp_path, name, data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(write(tmp_path / name, data))
    assert str(err.value).startswith(reason) and "\n" not in str(err.value)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="^cannot read file: No such file or directory$"):
        decode_image(tmp_path / "gone.png")


def test_pixel_limit_is_per_call_not_pil_global(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (100, 60), RED), tmp_path / "x.png")
    with pytest.raises(DecodeError, match=r"^image too large: 100 x 60 = 6000 pixels exceeds the limit of 5999 "):
        decode_image(path, max_pixels=5999)
    assert decode_image(path, max_pixels=6000).size == (100, 60)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # PIL's global guard would refuse this image
    assert decode_image(path).size == (100, 60)


# --------------------------------------------------------------------------------------------------------------------
# stratified hold-out


def test_stratified_holdout_per_class_and_seeded():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 2 + [3])
    held = stratified_holdout(labels, 0.2, seed=0)
    assert held.dtype == bool and held.shape == labels.shape
    assert [int(held[labels == c].sum()) for c in range(4)] == [10, 2, 1, 0]
    assert (stratified_holdout(labels, 0.2, seed=0) == held).all()
    assert (stratified_holdout(labels, 0.2, seed=1) != held).any()


def test_stratified_holdout_keeps_both_sides_for_every_class():
    labels = np.repeat(np.arange(5), [2, 3, 4, 5, 100])
    for fraction in (0.01, 0.99):
        held = stratified_holdout(labels, fraction, seed=3)
        for c in range(5):
            assert 0 < held[labels == c].sum() < (labels == c).sum()
    with pytest.raises(FeatxError, match="expected a number strictly between 0 and 1"):
        stratified_holdout(labels, 1.0, seed=0)

