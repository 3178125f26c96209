"""The served heads: loaded at start-up, picked up again when their folder is rewritten, reloaded on request.

A head folder is replaced by a rename (`featx fit-head --overwrite` writes a sibling and swaps it in), so a head is
read from one folder inode: a load during which the folder was swapped is retried, and a folder missing or
unreadable mid-swap leaves the loaded head serving. Callers take one `ServedHead` per request: old or new, never
half of each.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatxError
from ..finetuning.checkpoint import CONFIG as RUN_CONFIG
from ..finetuning.checkpoint import MODEL as RUN_MODEL
from ..heads.model import Head
from ..heads.persistence import HEAD_FILE, WEIGHTS_FILE, is_head_folder, load_head

log = logging.getLogger("featx.serve")
LOAD_ATTEMPTS = 5


@dataclass(frozen=True)
class ServedHead:
    """One head as served: its name, the Head, where it came from and the folder state it was read from."""

    name: str
    head: Head
    source: Path
    stamp: tuple

    @property
    def folder(self) -> Path:
        return self.source if self.source.is_dir() else self.source.parent


def _stamp(folder: Path) -> tuple:
    """What changes when a head folder is rewritten: the folder's inode and its files' sizes and mtimes."""
    parts = [os.stat(folder).st_ino]
    for name in (HEAD_FILE, WEIGHTS_FILE):
        st = os.stat(folder / name)
        parts += [st.st_ino, st.st_size, st.st_mtime_ns]
    return tuple(parts)


def _load(source: Path, trust: bool) -> Head:
    """The head at `source`; a segmentation head with its segment.json (the class ids of its masks)."""
    from ..segment import is_segment_head

    folder = source if source.is_dir() else source.parent
    if not (folder / HEAD_FILE).exists() and (folder / RUN_MODEL).is_file() and (folder / RUN_CONFIG).is_file():
        raise FeatxError(f"HEAD_DIR {source}: a featx finetune run, not a head folder: featx serve serves the heads "
                         f"of featx fit-head (the run's {RUN_MODEL} works as the weights of featx.extract(..., "
                         f"weights=...) / `featx extract -w`, whose store fit-head takes)")
    if is_segment_head(folder):
        from ..segment.probe import load_segment_head

        return load_segment_head(folder)
    return load_head(source, trust=trust)


def read_head(name: str, source: Path, trust: bool) -> ServedHead:
    """Load a head from one consistent folder state (FeatxError when it cannot be read)."""
    folder = source if source.is_dir() else source.parent
    last: Exception | None = None
    for _ in range(LOAD_ATTEMPTS):
        try:
            before = _stamp(folder)
        except OSError:
            _load(source, trust)  # raises the one-line reason: no folder, not a head, a pickle...
            continue  # the folder was mid-swap and is back: read it again
        try:
            head = _load(source, trust)
            if _stamp(folder) == before:
                return ServedHead(name, head, source, before)
        except (OSError, FeatxError) as err:
            last = err
    if isinstance(last, FeatxError):
        raise last
    if isinstance(last, OSError) and not folder.exists():
        raise FeatxError(f"{source}: no such head folder")
    raise FeatxError(f"{source}: head folder kept changing or disappeared while it was read ({last})")


def head_name(source: Path) -> str:
    folder = source if source.is_dir() or not source.suffix else source.parent
    return folder.resolve().name


class HeadRegistry:
    """Heads by name; `get` notices a rewritten folder on the next request after it is complete."""

    def __init__(self, sources: list[str], trust: bool, heads_dir: str | None):
        self.trust = trust
        self.heads_dir = Path(heads_dir) if heads_dir else None
        self._lock = threading.Lock()
        self._heads: dict[str, ServedHead] = {}
        paths = [Path(s) for s in sources]
        if self.heads_dir is not None and self.heads_dir.is_dir():
            given = {p.resolve() for p in paths}
            paths += sorted(p for p in self.heads_dir.iterdir()
                            if p.is_dir() and p.resolve() not in given and is_head_folder(p))
        for path in paths:
            if not path.exists():
                raise FeatxError(f"HEAD_DIR {path}: no such head folder")
            name = head_name(path)
            if name in self._heads:
                raise FeatxError(f"HEAD_DIR {path}: a head named {name!r} is already served "
                                 f"(from {self._heads[name].source}); head names come from their folder names")
            self._heads[name] = read_head(name, path, trust)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._heads)

    def get(self, name: str) -> ServedHead | None:
        """The head `name` as on disk now (the previous one while a rewrite is incomplete), or None if unknown."""
        with self._lock:
            served = self._heads.get(name)
        if served is None:
            return None
        try:
            if _stamp(served.folder) == served.stamp:
                return served
            fresh = read_head(name, served.source, self.trust)
        except (OSError, FeatxError) as err:
            log.debug("head %s: keeping the loaded head (%s)", name, err)
            return served
        with self._lock:
            self._heads[name] = fresh
        log.info("head %s: reloaded from %s", name, served.source)
        return fresh

    def all(self) -> list[ServedHead]:
        return [served for served in map(self.get, self.names()) if served is not None]

    def reload(self) -> list[str]:
        """Read every head again from disk, and pick up new head folders under --heads-dir. Returns the names."""
        with self._lock:
            current = dict(self._heads)
        fresh = {name: read_head(name, served.source, self.trust) for name, served in current.items()}
        if self.heads_dir is not None and self.heads_dir.is_dir():
            for path in sorted(self.heads_dir.iterdir()):
                if path.is_dir() and path.name not in fresh and is_head_folder(path):
                    fresh[path.name] = read_head(path.name, path, self.trust)
        with self._lock:
            self._heads = fresh
        return sorted(fresh)

    def add(self, name: str, folder: Path) -> ServedHead:
        served = read_head(name, folder, self.trust)
        with self._lock:
            self._heads[name] = served
        return served
