"""The HDF5 store, schema version 1: writing a complete store atomically and reading one back.

Layout (row i of every per-item dataset is the same image)::

    /            attrs featx_schema=1, featx_version, created, config_key, config (JSON text)
    /items/key   (N,) S64   sha256 of the image file's bytes
    /items/path  (N,) utf-8 path relative to the data root
    /items/label (N,) int64 class index, -1 unlabelled   (or /items/target (N,) float64 for regression)
    /items/split (N,) utf-8 train / val / test, '' when the source has no splits
    /items/root  (N,) int32 index into /roots: the data the row came from
    /items/stat  (N, 6) int64 the stat index: the stat of each row's file when its key was read (featx/keys.py)
    /roots       (R,) utf-8 the data a store holds rows of: a folder, CSV or list file (absolute), 'digits', 'uploads'
    /classes     (C,) utf-8
    /features/<tap>  (N, D) float32|float16, chunked by rows  (or (N, C, H, W) with pooling 'none'); in a store
                 that grew by appending, a virtual dataset over row files in <store>.rows/ (featx/rowfiles.py)
    /failed/path, /failed/reason  (F,) utf-8;  /failed/root (F,) int32 index into /roots
    /failed/key  (F,) S64   content key of each file that could not be decoded ('' when it could not be read)
    /failed/stat (F, 6) int64 the stat index entry of each failed file, as /items/stat

No pickles: strings are HDF5 string types, the config is JSON text. Any HDF5 reader understands it. /roots,
/items/root and /failed/root came later within schema 1: a store without them reads as holding one data whose root
was not recorded (''), and readers that do not know them ignore them. /items/stat, /failed/key and /failed/stat came
later still: without them a store's files are read again and its failures decoded again.

An unfinished run keeps its committed batches in ``<store>.parts/`` (featx/writer.py) as segment files
``seg-*.h5``, each with a ``key`` dataset and one dataset per tap.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import FeatxError
from .options import OptionError
from .gcpause import without_gc
from .rowfiles import hold_row_files, missing_row_files, rows_folder, store_bytes
from .store_attrs import describe_datasets

SCHEMA_VERSION = 1
UTF8 = h5py.string_dtype("utf-8")
KEY_DTYPE = "S64"
ROOT_DTYPE = np.int32
TARGET_CHUNK_BYTES = 1 << 20
BATCH_BYTES = 64 << 20  # float32 bytes of one batch that Store.batches reads by default
SEGMENT_GLOB = "seg-*.h5"
UNRECORDED_ROOT = ""  # the root of rows written before stores recorded their data


def parts_folder(store: Path) -> Path:
    """`<store>.parts/`: the lock and the committed batches of a run that has not sealed yet."""
    store = Path(store)
    return store.with_name(store.name + ".parts")


def segment_files(parts: Path) -> list[Path]:
    """Committed segments in a parts folder: a one-process run's, and those of every shard of a split job."""
    return sorted(parts.glob(SEGMENT_GLOB)) + sorted(parts.glob(f"*/{SEGMENT_GLOB}"))


def unfinished_run(store: Path) -> tuple[int, int] | None:
    """(committed batches, their rows) of an unfinished run on `store`, or None when there is none."""
    segments = segment_files(parts_folder(store))
    if not segments:
        return None
    rows = 0
    for segment in segments:
        with contextlib.suppress(OSError, KeyError):
            with h5py.File(segment, "r", locking=False) as h5:
                rows += h5["key"].shape[0]
    return len(segments), rows


def row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """HDF5 chunk shape for a per-item dataset: whole rows, about 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = int(max(1, min(max(shape[0], 1), TARGET_CHUNK_BYTES // row_bytes)))
    return (rows, *shape[1:])


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a complete file into place and make the rename durable."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


class _WriteGuard:
    """The file under an HDF5 file being created, for h5py's file-object driver: the first failed write (no space
    left, a file size limit) is kept and later writes are dropped.

    libhdf5 cannot close a file whose writes fail: it raises from close, keeps the file open, prints tracebacks and
    can crash the interpreter at exit. Behind this guard every write succeeds as far as libhdf5 knows, the file
    closes cleanly, and `create_h5` raises the kept error afterwards.
    """

    def __init__(self, path: Path):
        self._file = open(path, "w+b", buffering=0)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += self._file.write(view[done:])
            except OSError as err:
                self.error = err
        return len(view)

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self._file.truncate(size)
            except OSError as err:
                self.error = err
        return size

    def read(self, size=-1) -> bytes:
        return self._file.read(size)

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def create_h5(tmp: Path, final: Path):
    """A new HDF5 file open for writing at `tmp`, published at `final` (see publish) when the block succeeds; `tmp`
    is removed whatever happens, so a full disk gets its space back. A write that fails (no space left, file size
    limit) is raised as one OSError once the file is closed, instead of breaking libhdf5 (see _WriteGuard)."""
    try:
        guard = _WriteGuard(tmp)
        try:
            try:
                with h5py.File(guard, "w", locking=False) as h5:
                    yield h5
            except Exception:
                if guard.error is None:
                    raise
            if guard.error is not None:
                raise OSError(guard.error.errno, guard.error.strerror, str(tmp))
        finally:
            guard.close()
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def create_store(tmp: Path, final: Path, config: dict, config_key: str):
    """A new store file (see create_h5) with its root attributes; once the block has written its datasets, each is
    described in attributes (featx.store_attrs) before the file is published."""
    with create_h5(tmp, final) as h5:
        set_root_attrs(h5, config, config_key)
        yield h5
        describe_datasets(h5, config)


def _write_strings(group: h5py.Group, name: str, values) -> None:
    data = np.empty(len(values), dtype=object)
    data[:] = values if all(type(v) is str for v in values) else [str(v) for v in values]
    group.create_dataset(name, data=data, dtype=UTF8)


def create_items(
    h5: h5py.File, *, keys, paths, splits, labels=None, targets=None, classes=(), failed=(), roots=None,
    row_roots=None, failed_roots=None, failed_keys=None,
) -> None:
    """Write /items, /classes and /failed (and /roots with the rows' and failures' root indices, when `roots` is
    given; /failed/key, the content key of each failure or '', when `failed_keys` is) into an open, empty file."""
    items = h5.create_group("items")
    items.create_dataset("key", data=np.asarray(keys, dtype=KEY_DTYPE))
    _write_strings(items, "path", paths)
    _write_strings(items, "split", splits)
    if targets is not None:
        items.create_dataset("target", data=np.asarray(targets, dtype=np.float64))
    else:
        items.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
    _write_strings(h5, "classes", classes)
    fail = h5.create_group("failed")
    _write_strings(fail, "path", [p for p, _ in failed])
    _write_strings(fail, "reason", [r for _, r in failed])
    if failed_keys is not None:
        fail.create_dataset("key", data=np.asarray(failed_keys, dtype=KEY_DTYPE).reshape(len(failed)))
    if roots is not None:
        _write_strings(h5, "roots", roots)
        items.create_dataset("root", data=np.asarray(row_roots, dtype=ROOT_DTYPE).reshape(len(keys)))
        fail.create_dataset("root", data=np.asarray(failed_roots, dtype=ROOT_DTYPE).reshape(len(failed)))


def create_features(h5: h5py.File, tap: str, shape: tuple[int, ...], dtype) -> h5py.Dataset:
    """An empty /features/<tap> dataset chunked by rows."""
    dtype = np.dtype(dtype)
    return h5.require_group("features").create_dataset(
        tap, shape=shape, dtype=dtype, chunks=row_chunks(shape, dtype.itemsize) if shape[0] else None
    )


def write_file_stats(h5: h5py.File, stats: np.ndarray, failed_stats: np.ndarray, host: str) -> None:
    """/items/stat and /failed/stat: one stat row per item and per failure (featx.keys.STAT_FIELDS), read on
    machine `host`."""
    for group, values in (("items", stats), ("failed", failed_stats)):
        ds = h5[group].create_dataset("stat", data=np.asarray(values, dtype=np.int64))
        ds.attrs["host"] = host


def set_root_attrs(h5: h5py.File, config: dict, config_key: str) -> None:
    h5.attrs["featx_schema"] = SCHEMA_VERSION
    h5.attrs["featx_version"] = __version__
    h5.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    h5.attrs["config_key"] = config_key
    h5.attrs["config"] = json.dumps(config, sort_keys=True)


def write_store(
    path,
    *,
    config: dict,
    keys,
    paths,
    labels=None,
    splits=None,
    classes=(),
    features: dict,
    targets=None,
    failed=(),
    config_key: str | None = None,
    root: str | None = None,
) -> Path:
    """Write a complete schema-v1 store in one go (temp file + atomic rename). Returns the path. `root` records
    the data every row and failure came from."""
    path = Path(path)
    n = len(keys)
    splits = [""] * n if splits is None else splits
    labels = [-1] * n if labels is None and targets is None else labels
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with create_store(tmp, path, config, config_key or config_fingerprint(config)) as h5:
        create_items(h5, keys=keys, paths=paths, splits=splits, labels=labels, targets=targets,
                     classes=classes, failed=failed, roots=None if root is None else [root],
                     row_roots=np.zeros(n), failed_roots=np.zeros(len(failed)))
        for tap, arr in features.items():
            arr = np.asarray(arr)
            create_features(h5, tap, arr.shape, arr.dtype)[...] = arr
    return path


def config_fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of a config: the identity of how rows were computed."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _strings(ds) -> np.ndarray:
    _expect(ds, "strings", h5py.check_string_dtype(ds.dtype) is not None)
    return decode_strings(ds[...])


def decode_strings(values: np.ndarray, encoding: str = "utf-8", errors: str = "replace") -> np.ndarray:
    """Strings as h5py reads them (bytes) as an object array of str: joined and decoded in one call (HDF5 strings
    hold no NUL byte), one by one where that does not give them back."""
    values = np.asarray(values).ravel()
    if values.dtype.kind == "S":  # fixed length: sliced from one decoded text when every value fills its width
        raw, width = values.tobytes(), values.dtype.itemsize
        text = raw.decode(encoding, errors) if b"\0" not in raw else ""
        if width and len(values) and len(text) == len(raw):
            out = np.empty(len(values), dtype=object)
            out[:] = [text[i:i + width] for i in range(0, len(text), width)]
            return out
        values = values.astype(object)
    if len(values) and all(type(v) is bytes for v in values):
        joined = b"\0".join(values).decode(encoding, errors).split("\0")
        if len(joined) == len(values):
            out = np.empty(len(values), dtype=object)
            out[:] = joined
            return out
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode(encoding, errors) if isinstance(v, bytes) else str(v) for v in values]
    return out


def _expect(ds, what: str, ok: bool) -> None:
    """A damaged-store error unless `ds` is a 1-D dataset of the expected type (libhdf5 can crash reading a
    damaged variable-length type, so types are checked before any value is read)."""
    if not ok or len(ds.shape) != 1:
        raise FeatxError(f"{ds.file.filename}: damaged featx store ({ds.name} holds {ds.dtype} {ds.shape}, expected 1-D {what})")


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__


def _check_string_heaps(h5: h5py.File, path: Path) -> None:
    """Refuse the damage libhdf5 does not survive when it reads variable-length strings.

    Variable-length strings (paths, splits, classes, failures, the config attributes) are references into global
    heap collections, and libhdf5 trusts both: a heap object with index 0 and size 0 (zeroed or damaged bytes)
    makes it walk its collection forever, and a reference with a damaged length makes it allocate up to 4 GiB
    before it notices. So before any string is read, every collection is walked the way libhdf5 walks it
    (collections start with 'GCOL' and lie outside the datasets' raw data, mostly feature rows, which need no
    search), and every reference of a contiguous string dataset must point into one of them.
    """
    raw: list[tuple[int, int]] = []
    strings: list[tuple[str, int, int]] = []

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset):
            offset = obj.id.get_offset()
            if offset is not None:
                raw.append((offset, offset + obj.id.get_storage_size()))
                info = h5py.check_string_dtype(obj.dtype)
                if info is not None and info.length is None:
                    strings.append((obj.name, offset, obj.id.get_storage_size()))
            elif obj.chunks is not None:
                obj.id.chunk_iter(lambda chunk: raw.append((chunk.byte_offset, chunk.byte_offset + chunk.size)))

    h5.visititems(visit)
    plist = h5.id.get_create_plist()
    addr_size, len_size = plist.get_sizes()
    base = plist.get_userblock()
    formats = {4: "I", 8: "Q"}
    if addr_size not in formats or len_size not in formats:
        return
    header = 8 + len_size  # collection: 'GCOL', version, 3 reserved bytes, size; a heap object header is as long
    collections: dict[int, int] = {}  # address (as references hold it) -> size
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        start = 0
        for lo, hi in [*sorted(raw), (file_size, file_size)]:
            if lo > start:
                f.seek(start)
                gap = f.read(lo - start)
                found = gap.find(b"GCOL")
                while found >= 0:
                    size = _walk_heap_collection(f, start + found, file_size, header, "<" + formats[len_size], path)
                    if size is not None:
                        collections[start + found - base] = size
                    found = gap.find(b"GCOL", found + 4)
            start = max(start, hi)
        # a reference: length, collection address, object index (packed, little-endian)
        reference = np.dtype([("length", "<u4"), ("address", f"<u{addr_size}"), ("index", "<u4")])
        starts = np.array(sorted(collections), dtype=np.uint64)
        sizes = np.array([collections[a] for a in sorted(collections)], dtype=np.int64)
        for name, offset, nbytes in strings:
            f.seek(offset)
            refs = f.read(nbytes)
            refs = np.frombuffer(refs, dtype=reference, count=len(refs) // reference.itemsize)
            used = refs[(refs["length"] != 0) | (refs["address"] != 0)]
            if not len(used):
                continue
            at = np.searchsorted(starts, used["address"].astype(np.uint64))
            inside = at < len(starts)
            inside[inside] = starts[at[inside]] == used["address"][inside]
            room = np.where(inside, sizes[np.minimum(at, max(len(sizes) - 1, 0))] if len(sizes) else -1, -1)
            if (used["length"].astype(np.int64) > room).any():
                raise FeatxError(f"{path}: damaged featx store (a string of {name} points outside its heap)")


def _walk_heap_collection(f, address: int, file_size: int, header: int, size_format: str, path: Path) -> int | None:
    """Walk the objects of the collection at `address` as libhdf5 does: its size, None when libhdf5 would refuse
    to read it anyway, FeatxError where the walk cannot advance."""
    f.seek(address)
    head = f.read(header)
    if len(head) < header or head[4] != 1:
        return None
    (size,) = struct.unpack_from(size_format, head, 8)
    if size > file_size - address:
        return None
    heap = np.frombuffer(head + f.read(size - header), dtype=np.uint8)
    ends = _walk_ends(heap, header, 8 if header % 8 == 0 else 4)
    if ends is None:  # the walk left the grid of aligned positions (a free-space object of odd size)
        ends = _walk_ends(heap, header, 1)
    if not ends:
        raise FeatxError(f"{path}: damaged featx store (global heap collection at byte {address} is corrupt)")
    return size


def _walk_ends(heap: np.ndarray, header: int, grid: int) -> bool | None:
    """Whether libhdf5's walk over the objects of a heap collection (`heap`, its bytes) ends, or reaches an object
    that does not advance it (index 0 and size 0); None when the walk leaves the positions `header + k * grid`.

    Each object starts with a `header`-byte header: index (2 bytes), reference count, reserved, size (from byte 8);
    the walk starts at `header` and goes on while a header fits, by `header` + the size rounded up to 8 (index
    0, free space: by the size). The step from every position of the grid is computed at once, and the walk's end
    found by pointer doubling (log2 of the positions steps) instead of one Python step per object."""
    size = len(heap)
    at = np.arange(header, size - header + 1, grid, dtype=np.int64)  # where an object header fits
    n = len(at)
    if not n:
        return True
    index = heap[at].astype(np.int64) | heap[at + 1].astype(np.int64) << 8
    length = np.zeros(n, dtype=np.uint64)
    for byte in range(header - 8):
        length |= heap[at + 8 + byte].astype(np.uint64) << np.uint64(8 * byte)
    length = np.minimum(length, np.uint64(size)).astype(np.int64)  # larger ends the walk all the same
    step = np.where(index != 0, header + (length + 7) // 8 * 8, length)
    target = at + step
    end, stuck, off = n, n + 1, n + 2  # states the walk stays in
    following = np.where(step == 0, stuck, np.where(
        target + header > size, end, np.where((target - header) % grid != 0, off, (target - header) // grid)))
    following = np.concatenate([following, [end, stuck, off]])
    for _ in range(n.bit_length() + 1):
        following = following[following]
    state = following[0]
    return None if state == off else bool(state == end)


class Store:
    """A featx store opened read-only. Metadata is loaded eagerly; features are read on demand."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        self._rows_fd = None
        try:
            self.schema = int(h5.attrs.get("featx_schema", 0))
            self.featx_version = str(h5.attrs.get("featx_version", ""))
            self.created = str(h5.attrs.get("created", ""))
            self.config: dict = json.loads(h5.attrs.get("config", "{}"))
            self.config_key: str = str(h5.attrs.get("config_key", ""))
            items = h5["items"]
            _expect(items["key"], "ASCII keys", items["key"].dtype.kind == "S")
            self.keys = decode_strings(items["key"][...], "ascii", "strict")
            self.paths = _strings(items["path"])
            self.splits = _strings(items["split"]) if "split" in items else np.full(len(self.keys), "", dtype=object)
            if "target" in items:
                _expect(items["target"], "float targets", items["target"].dtype.kind in "fiu")
            self.targets = items["target"][...].astype(np.float64) if "target" in items else None
            if "label" in items:
                _expect(items["label"], "integer labels", items["label"].dtype.kind in "iu")
                self.labels = items["label"][...].astype(np.int64)
            else:
                self.labels = np.full(len(self.keys), -1, dtype=np.int64)
            self.classes = list(_strings(h5["classes"])) if "classes" in h5 else []
            self.taps = list(h5["features"].keys()) if "features" in h5 else []
            self.failed = (
                list(zip(_strings(h5["failed/path"]), _strings(h5["failed/reason"]))) if "failed" in h5 else []
            )
            self._read_roots(h5)
            self._read_failure_keys(h5)
            self._read_file_stats(items, h5.get("failed"))
            lengths = {"/items/path": len(self.paths), "/items/split": len(self.splits), "/items/label": len(self.labels),
                       "/items/root": len(self.row_roots)}
            if self.targets is not None:
                lengths["/items/target"] = len(self.targets)
            self._check_rows(lengths)
            rows = {}
            self.row_bytes = 0  # bytes of one row over every tap
            for tap in self.taps:
                ds = h5["features"][tap]
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "fiu" or len(ds.shape) < 1:
                    raise FeatxError(f"{path}: damaged featx store (/features/{tap} is not an array of numbers)")
                rows[f"/features/{tap}"] = ds.shape[0]
                self.row_bytes += int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        except (KeyError, ValueError, OSError, RuntimeError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FeatxError(f"{path}: damaged featx store ({_first_line(err)})") from err
        self._check_rows(rows)
        if "features" in h5:
            self._hold_row_files(h5)

    def _read_roots(self, h5: h5py.File) -> None:
        """`roots` (the data the store holds rows of), `row_roots` and `failed_roots` (indices into roots); a store
        written before roots were recorded holds one data of root UNRECORDED_ROOT."""
        if "roots" not in h5:
            self.roots = [UNRECORDED_ROOT]
            self.row_roots = np.zeros(len(self.keys), dtype=ROOT_DTYPE)
            self.failed_roots = np.zeros(len(self.failed), dtype=ROOT_DTYPE)
            return
        self.roots = [str(r) for r in _strings(h5["roots"])]
        indices = {}
        for name in ("items/root", "failed/root"):
            _expect(h5[name], "root indices", h5[name].dtype.kind in "iu")
            indices[name] = h5[name][...].astype(ROOT_DTYPE)
            if indices[name].size and not 0 <= indices[name].min() <= indices[name].max() < len(self.roots):
                raise FeatxError(f"{self.path}: damaged featx store (/{name} points outside /roots)")
        self.row_roots, self.failed_roots = indices["items/root"], indices["failed/root"]
        if len(self.failed_roots) != len(self.failed):
            raise FeatxError(f"{self.path}: damaged featx store (/failed/root has {len(self.failed_roots)} rows, "
                             f"/failed/path has {len(self.failed)})")

    def _hold_row_files(self, h5: h5py.File) -> None:
        """Refuse a store whose row files are missing; hold its row folder while open (featx/rowfiles.py)."""
        missing = missing_row_files(h5, self.path)
        if missing:
            raise FeatxError(f"{self.path}: its feature rows live in {rows_folder(self.path)}, which lacks {missing[0]}"
                             f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: copy or move a store "
                             f"together with that folder")
        self._rows_fd = hold_row_files(self.path)

    def _read_failure_keys(self, h5: h5py.File) -> None:
        """`failed_keys`: the content key of each failure, '' where the file could not be read or the store does not
        record it."""
        key = h5.get("failed/key")
        if isinstance(key, h5py.Dataset) and key.dtype.kind == "S" and key.shape == (len(self.failed),):
            self.failed_keys = decode_strings(key[...], "ascii", "strict")
        else:
            self.failed_keys = np.full(len(self.failed), "", dtype=object)

    def _read_file_stats(self, items: h5py.Group, failed: h5py.Group | None) -> None:
        """`file_stats` ((N, 6) int64, see featx/keys.py), `failed_stats` ((F, 6), zeros where not recorded) and
        `file_stats_host`; all None when the store has no stat index."""
        stat = items.get("stat")
        usable = isinstance(stat, h5py.Dataset) and stat.dtype.kind == "i" and len(stat.shape) == 2
        self.file_stats = stat[...].astype(np.int64) if usable else None
        self.file_stats_host = str(stat.attrs.get("host", "")) if usable else None
        self.failed_stats = None
        if usable:
            shape = (len(self.failed), stat.shape[1])
            stat = failed.get("stat") if failed is not None else None
            recorded = isinstance(stat, h5py.Dataset) and stat.dtype.kind == "i" and stat.shape == shape
            self.failed_stats = stat[...].astype(np.int64) if recorded else np.zeros(shape, dtype=np.int64)

    def root_counts(self) -> dict[str, int]:
        """Rows per data root, in the store's order."""
        counts = np.bincount(self.row_roots, minlength=len(self.roots))
        return {root: int(n) for root, n in zip(self.roots, counts)}

    def _check_rows(self, lengths: dict[str, int]) -> None:
        """A damaged-store error unless every dataset named in `lengths` has as many rows as /items/key."""
        n = len(self.keys)
        for name, length in lengths.items():
            if length != n:
                raise FeatxError(f"{self.path}: damaged featx store ({name} has {length} rows, /items/key has {n})")

    def __len__(self) -> int:
        return len(self.keys)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()
        if self._rows_fd is not None:
            os.close(self._rows_fd)
            self._rows_fd = None

    def _dataset(self, tap: str) -> h5py.Dataset:
        if tap not in self.taps:
            raise FeatxError(f"tap {tap!r} is not in {self.path}: it holds {', '.join(self.taps) or 'no features'}")
        with self._reading(tap):
            return self._h5["features"][tap]

    @contextlib.contextmanager
    def _reading(self, tap: str):
        """Damaged feature data (a bad chunk, a truncated file) as a one-line FeatxError."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            raise FeatxError(f"{self.path}: damaged featx store (reading /features/{tap}: {_first_line(err)})") from err

    def feature_shape(self, tap: str) -> tuple[int, ...]:
        """Per-row shape of a tap's features."""
        return tuple(self._dataset(tap).shape[1:])

    def feature_dtype(self, tap: str) -> np.dtype:
        return self._dataset(tap).dtype

    def features(self, tap: str, rows=None) -> np.ndarray:
        """Rows of a tap as float32: all of them, a slice, or an index array (any order, repeats allowed)."""
        ds = self._dataset(tap)
        with self._reading(tap):
            if rows is None:
                data = ds[...]
            elif isinstance(rows, slice):
                data = ds[rows]
            else:
                rows = np.asarray(rows)
                if rows.dtype == bool:
                    rows = np.flatnonzero(rows)
                data = read_rows(ds, rows)
        return data.astype(np.float32, copy=False)

    def iter_features(self, tap: str, chunk_rows: int = 65536):
        """Yield (start, float32 array) over a tap in row chunks, for data larger than memory."""
        for rows, block in self.batches(tap, size=chunk_rows):
            yield int(rows[0]), block

    def batches(self, tap: str, rows=None, size: int | None = None):
        """Yield (row indices, float32 features) over a tap, `size` rows at a time (default: about BATCH_BYTES of
        float32), in the order of `rows`: None (every row), a slice, an index array or a boolean mask. Memory holds
        one batch (an index batch reads at most the span of 4 x `size` rows, see read_rows), never the whole tap."""
        ds = self._dataset(tap)
        if size is None:
            size = max(1, BATCH_BYTES // max(1, 4 * int(np.prod(ds.shape[1:], dtype=np.int64))))
        elif isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise FeatxError(f"batches(size={size!r}): expected a whole number of rows >= 1")
        n = ds.shape[0]
        if rows is None or (isinstance(rows, slice) and rows.step in (None, 1)):
            start, stop, _ = (rows or slice(None)).indices(n)
            for lo in range(start, stop, size):
                hi = min(lo + size, stop)
                with self._reading(tap):
                    block = ds[lo:hi]
                yield np.arange(lo, hi, dtype=np.int64), block.astype(np.float32, copy=False)
            return
        index = np.arange(n)[rows] if isinstance(rows, slice) else self.row_index(rows)
        for lo in range(0, len(index), size):
            part = index[lo : lo + size]
            with self._reading(tap):
                block = read_rows(ds, part)
            yield part, block.astype(np.float32, copy=False)

    def row_index(self, rows) -> np.ndarray:
        """An index array or boolean mask over the store's rows as int64 indices, checked against its length."""
        rows = np.asarray(rows)
        n = len(self)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise FeatxError(f"a row mask of shape {rows.shape} for {self.path}, which has {n} rows")
            return np.flatnonzero(rows)
        if rows.dtype.kind not in "iu" or rows.ndim != 1:
            raise FeatxError(f"rows of type {rows.dtype} {rows.shape}: expected a 1-D index array, a boolean mask "
                             f"or a slice")
        if rows.size and not -n <= rows.min() <= rows.max() < n:
            outside = rows.max() if rows.max() >= n else rows.min()
            raise FeatxError(f"row {outside} is outside {self.path}, which has {n} rows")
        return np.where(rows < 0, rows + n, rows).astype(np.int64)

    def resolve_tap(self, tap: str | None = None) -> str:
        """`tap`, checked against the store; without one, the store's only tap."""
        if tap is not None:
            self._dataset(tap)
            return tap
        if len(self.taps) != 1:
            if not self.taps:
                raise FeatxError(f"{self.path} holds no features")
            raise OptionError("{path} holds several taps ({taps}): choose one ({tap})", path=self.path,
                              taps=", ".join(self.taps))
        return self.taps[0]

    def split(self, name: str, tap: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the rows of split `name` ('train', 'val', 'test'): X float32 rows of `tap` (default: the only
        tap), y the labels (int64, -1 unlabelled) or, in a regression store, the targets. Reads the split whole."""
        mask = self.split_mask(name)
        y = self.targets if self.targets is not None else self.labels
        return self.features(self.resolve_tap(tap), mask), y[mask]

    def split_mask(self, name: str) -> np.ndarray:
        """A boolean mask of the rows of split `name`; FeatxError naming the store's splits when none has it."""
        mask = self.splits.astype(str) == name
        if not mask.any():
            held = ", ".join(s or "(none)" for s in sorted(set(self.splits.astype(str)))) or "no rows"
            raise FeatxError(f"split {name!r} is not in {self.path}: its rows' splits are {held}")
        return mask

    def metadata(self) -> dict[str, np.ndarray]:
        """One array per column, a row per store row: path (as stored), image_path (resolved against the row's data
        root, when it is a folder or file path), key, split, and label + class_name (None when unlabelled) or
        target. What to_pandas and featx export write beside the embeddings."""
        bases = [os.path.dirname(r) if os.path.isfile(r) else r for r in self.roots]
        image_path = np.array([os.path.join(bases[r], p) if os.path.isabs(bases[r]) else p
                               for r, p in zip(self.row_roots, self.paths)], dtype=object)
        columns = {"path": self.paths, "image_path": image_path, "key": self.keys, "split": self.splits}
        if self.targets is not None:
            columns["target"] = self.targets
        else:
            names = np.array([*self.classes, None], dtype=object)
            known = (self.labels >= 0) & (self.labels < len(self.classes))
            columns["label"] = self.labels
            columns["class_name"] = names[np.where(known, self.labels, len(self.classes))]
        return columns

    def to_pandas(self, taps=None):
        """A pandas DataFrame with a row per store row: the metadata() columns, then one column per tap (`taps`:
        None = every tap, a name or a list; [] = none) whose cells are that row's float32 array. Reads the taps
        whole: for stores larger than memory use batches() or featx export."""
        try:
            import pandas as pd
        except ImportError:
            raise FeatxError("Store.to_pandas needs pandas: pip install 'featx[export]'") from None
        frame = pd.DataFrame(self.metadata())
        for tap in self.taps if taps is None else [taps] if isinstance(taps, str) else list(taps):
            frame[tap] = list(self.features(tap))
        return frame

    def summary(self) -> dict:
        """What `featx info` shows: counts, classes, splits, taps, failures, size, config."""
        labelled = self.labels[self.labels >= 0]
        split_names, split_counts = np.unique(self.splits.astype(str), return_counts=True)
        return {
            "path": str(self.path),
            "schema": self.schema,
            "featx_version": self.featx_version,
            "created": self.created,
            "items": len(self),
            "classes": {c: int((labelled == i).sum()) for i, c in enumerate(self.classes)},
            "task": "regression" if self.targets is not None else ("classification" if len(labelled) else "unlabelled"),
            "splits": {str(s) or "(none)": int(c) for s, c in zip(split_names, split_counts)},
            "taps": {
                t: {"shape": list(self.feature_shape(t)), "dtype": str(self.feature_dtype(t))} for t in self.taps
            },
            "failed": len(self.failed),
            "roots": {root or "(not recorded)": n for root, n in self.root_counts().items()},
            "bytes": store_bytes(self.path),
            "config_key": self.config_key,
            "config": self.config,
        }


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read arbitrary rows of a dataset: one contiguous read of their span when dense, else per sorted unique row."""
    if rows.size == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 4 * unique.size:
        block = ds[lo:hi][unique - lo]
    else:
        block = ds[unique]
    return block[inverse]


@without_gc
def open_store(path) -> Store:
    """Open a featx store read-only (`featx info`): returns a Store (rows, labels, splits, config; `.features(tap)`,
    `.summary()`; a context manager); a one-line FeatxError when it is missing, damaged, foreign or newer."""
    path = Path(path)
    if not path.exists():
        unfinished = unfinished_run(path)
        if unfinished:
            batches, rows = unfinished
            raise FeatxError(
                f"{path}: no store sealed yet; {parts_folder(path)} holds {batches} committed batches ({rows} rows) "
                f"of an unfinished run: run the same command again to resume it"
            )
        raise FeatxError(f"{path}: no such store")
    if path.is_dir():
        raise FeatxError(f"{path}: is a folder, expected a featx .h5 store")
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise FeatxError(f"{path}: not a readable HDF5 file ({_first_line(err)})") from err
    try:
        _check_string_heaps(h5, path)
        schema = h5.attrs.get("featx_schema")
        if schema is None or "items" not in h5:
            raise OptionError("{path}: not a featx store (no featx_schema attribute; for other HDF5/NPZ files use "
                              "{x}/{y})", path=path)
        if int(schema) > SCHEMA_VERSION:
            raise FeatxError(
                f"{path}: store schema {int(schema)} is newer than this featx understands ({SCHEMA_VERSION}): upgrade featx"
            )
        return Store(path, h5)
    except FeatxError:
        h5.close()
        raise
    except Exception as err:  # h5py raises many types on damaged files
        h5.close()
        raise FeatxError(f"{path}: damaged featx store ({type(err).__name__}: {_first_line(err)})") from err
