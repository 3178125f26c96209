"""What an `extract` call asks for, described once, and the check that an unchanged rerun has nothing to do.

`describe(arguments)` is the identity of a call: every argument of `extract` except those that cannot change a row
(NOT_IDENTITY) or that force a real run (FORCING). A new option of `extract` is part of the description unless it is
listed there, so it can never be ignored by mistake. A sealed store records the description with the environment
that resolved it (library versions, the host's CPU flags and GPUs, cache locations, the weights file) under
`config["request"]`. `up_to_date` compares both with the present call and the files' content keys with the store's
rows, without importing torch: an unchanged rerun answers in well under a second and touches nothing. Content keys
come from the store's stat index (featx/keys.py): only files whose stat changed are read. `check` also hands the
source and keys it found to the real run (`featx.extraction.run`), so that no file is read twice.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .choices import recorded_decode
from .cpu import cpu_fields
from .errors import FeatxError
from .options import OptionError
from .extract_options import DEFAULT_MATCH, ExtractOptions
from .gcpause import without_gc
from .retention import data_root, data_rows, holds, holds_as_is, merge, row_bound
from .sources import Source, load_source, sha256_file

# The parameters of `extract` that are not options: what and where, and the call's plumbing
CALL = {"progress": False, "log": None, "checked": None}
NOT_IDENTITY = frozenset({"data", "output", *CALL, *ExtractOptions.names(identity=False)})
FORCING = frozenset(ExtractOptions.names(forcing=True))  # when given, the call always runs for real
# featx.extract's defaults, so that callers can complete a call's arguments and check it without importing extract
# (and torch); tests/test_noop_rerun.py holds this equal to extract's signature.
EXTRACT_DEFAULTS = {**ExtractOptions.defaults(), **CALL}
LIBRARIES = ("featx", "torch", "torchvision", "timm")
ENVIRONMENT = ("TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "CUDA_VISIBLE_DEVICES", "FEATX_OFFLINE")


@dataclass
class ExtractResult:
    """What one `extract` call did: rows of its data computed (added with new features), reused (their features
    were already computed: in the store, or committed by an interrupted run) and failed; old rows dropped (their
    content is no longer in the store); the rows of other data the store keeps (`other`: root -> rows); `rows`,
    the store rows of this data, in its order."""

    store_path: Path
    n_items: int
    n_computed: int
    n_reused: int
    n_failed: int
    seconds: float
    images_per_second: float
    store_bytes: int
    sealed: bool
    config: dict = field(repr=False)
    failed: list[tuple[str, str]] = field(default_factory=list, repr=False)
    note: str = ""  # a shard that did not seal: why
    n_dropped: int = 0
    other: dict[str, int] = field(default_factory=dict)
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    tuning: dict | None = None  # the workers, threads and batch size the computing used (featx.tuning.Choice)
    n_unchanged_failed: int = 0  # failures of files whose content failed before: not decoded again

    def summary(self) -> str:
        size = self.store_bytes / 1e6
        speed = f", {self.images_per_second:.1f} img/s" if self.n_computed else ""
        if self.note:
            return f"{self.note}: {self.n_computed} computed, {self.n_failed} failed, {self.seconds:.1f} s{speed}"
        state = "" if self.sealed else " (already up to date)"
        return (
            f"{self.n_items} images in {self.store_path} ({size:.1f} MB){state}: {self.n_computed} computed, "
            f"{self.n_reused} reused, {self.n_dropped} dropped, {self.n_failed} failed{self.unchanged_summary()}, "
            f"{self.seconds:.1f} s{speed}{self.other_summary()}"
        )

    def unchanged_summary(self) -> str:
        """' (2 still fail: unchanged since they failed, not retried)' when some failures were not retried."""
        n = self.n_unchanged_failed
        if not n:
            return ""
        return f" ({n} still fail{'s' if n == 1 else ''}: unchanged since {'it' if n == 1 else 'they'} failed, not retried)"

    def other_summary(self) -> str:
        """'; it also keeps 398 rows of /data/hym' when the store holds rows of other data, else ''."""
        if not self.other:
            return ""
        rows = sum(self.other.values())
        if len(self.other) > 1:
            return f"; it also keeps {rows} rows of {len(self.other)} other data (featx info {self.store_path})"
        return f"; it also keeps {rows} rows of {next(iter(self.other)) or 'data whose root was not recorded'}"

    def to_dict(self) -> dict:
        """The --json form of the result."""
        return {
            "store": str(self.store_path), "items": self.n_items, "computed": self.n_computed,
            "reused": self.n_reused, "dropped": self.n_dropped, "failed": self.n_failed,
            "still_failing": self.n_unchanged_failed,
            "other_data": dict(self.other), "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2), "bytes": self.store_bytes,
            "failures": [{"path": p, "reason": r} for p, r in self.failed], "tuning": self.tuning,
        }


def extract_options_from_config(config: dict, weights=()) -> dict:
    """Keyword arguments of `extract` that rebuild the extractor a store (or a head) was made with; `weights`: the
    weights files the user gave (-w), see `weights_for`."""
    transform = config["transform"]
    return {
        "backbone": config["backbone"],
        "weights": weights_for(config, weights),
        "weights_match": config.get("weights_match", DEFAULT_MATCH),
        "decode": recorded_decode(config),
        "taps": list(config["taps"]),
        "pooling": config["pooling"],
        "token_pool": config.get("token_pool", "cls"),
        "image_size": transform["crop"],
        "resize": transform["resize"],
        "precision": config["precision"],
        "dtype": config["dtype"],
    }


def weights_for(config: dict, given=()) -> str:
    """The -w value that rebuilds the weights a store's (or a head's) `config` records: a file of `given` (one path
    or several: -w FILE) whose sha256 is the recorded one, else the recorded file when it still holds those bytes,
    else the recorded weights name (torchvision or timm weights, or 'none'). A given file of other bytes, and a
    recorded file that is missing or changed, are one-line OptionErrors that say what to pass as `weights`."""
    files = [given] if isinstance(given, (str, os.PathLike)) else list(given or ())
    recorded, expected = config.get("weights_path"), config.get("weights_sha256")
    for file in files:
        if not os.path.isfile(file):
            raise OptionError("{weights=$file}: no such file, expected the weights file the features were computed "
                              "with", file=os.fspath(file))
        if not recorded:
            raise OptionError("{weights=$file}: the features were computed with weights {recorded}, not with a file: "
                              "drop {weights}", file=os.fspath(file), recorded=config.get("weights"))
        if sha256_file(file) == expected:
            return os.fspath(file)
    wanted = f"the file of sha256 {str(expected)[:16]}..."
    if files:
        raise OptionError("{weights=}: sha256 {sha}..., but the features were computed with {name} ({wanted}): pass "
                          "that file", weights=os.fspath(files[0]), sha=sha256_file(files[0])[:16],
                          name=os.path.basename(recorded), wanted=wanted)
    if not recorded:
        return config["weights"]
    if not os.path.isfile(recorded):
        raise OptionError("the weights file {recorded} that the features were computed with is missing: pass "
                          "{weights=FILE}, that file where it is now ({wanted})", recorded=recorded, wanted=wanted)
    if sha256_file(recorded) != expected:
        raise OptionError("the weights file {recorded} has changed since the features were computed: pass "
                          "{weights=FILE}, the original weights ({wanted})", recorded=recorded, wanted=wanted)
    return recorded


def call_arguments(data, output, **given) -> dict:
    """Every argument of an `extract(data, output, **given)` call, defaults included (what `extract` records)."""
    unknown = set(given) - set(EXTRACT_DEFAULTS)
    if unknown:
        raise TypeError(f"extract() got unexpected arguments {sorted(unknown)}")
    return {"data": data, "output": output, **EXTRACT_DEFAULTS, **given}


def describe(arguments: dict) -> dict:
    """The identity of an extract call (its arguments minus NOT_IDENTITY and FORCING), as plain JSON values."""
    chosen = {name: value for name, value in arguments.items() if name not in NOT_IDENTITY | FORCING}
    return json.loads(json.dumps(chosen, sort_keys=True, default=str))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _host() -> dict:
    """What `--device auto` and `--precision auto` depend on: the CPU's feature flags and the GPUs present."""
    flags = cpu_fields()["flags"]
    try:
        gpus = sorted(name for name in os.listdir("/dev") if name.startswith(("nvidia", "dri", "kfd")))
    except OSError:
        gpus = []
    return {"machine": platform.machine(), "system": platform.system(), "cpu_flags": flags, "gpus": gpus}


def environment(weights_file: str | None) -> dict:
    """What turned a request into a config besides the request itself."""
    return {
        "versions": {name: _version(name) for name in LIBRARIES},
        "host": _host(),
        "variables": {name: os.environ.get(name) for name in ENVIRONMENT},
        "weights_file": weights_file,
    }


def record(arguments: dict, weights_file: str | None) -> dict:
    """The `request` entry a store's config keeps: the call's description and its environment."""
    return {"arguments": describe(arguments), "environment": environment(weights_file)}


class Check(NamedTuple):
    """What `check` found: the result when the call has nothing to do, else None; and the source and its keys
    (featx.keys.FileKeys) when it read them, for the real run to reuse."""

    result: ExtractResult | None
    source: Source | None = None
    keys: object = None


def up_to_date(arguments: dict) -> ExtractResult | None:
    """The result of an extract call with these `arguments` when the store at `arguments['output']` already holds
    exactly what it would seal (see `check`); None when the call must run."""
    return check(arguments).result


@without_gc
def check(arguments: dict) -> Check:
    """Whether the call has nothing to do: same request and environment, same weights file content, every file's
    content key, path, label and split in the store or among its recorded decode failures (a failed file whose
    content is unchanged fails again: it is not retried), every folder readable, no unfinished run, and the same
    rows of other data under the call's retention."""
    started = time.perf_counter()
    arguments = {**EXTRACT_DEFAULTS, **arguments}
    if any(arguments.get(name) for name in FORCING) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return Check(None)
    output = Path(arguments["output"])
    if not output.is_file() or output.with_name(output.name + ".parts").exists():
        return Check(None)
    from .keys import StatIndex, file_keys
    from .rowfiles import store_bytes
    from .store import open_store

    source = keys = None
    try:
        with open_store(output) as store:
            config = store.config
            recorded = config.get("request") or {}
            if recorded.get("arguments") != describe(arguments):
                return Check(None)
            env = recorded.get("environment") or {}
            if env != environment(env.get("weights_file")) or not _same_weights(env.get("weights_file"), config):
                return Check(None)
            source = load_source(arguments["data"])
            root = data_root(arguments["data"])
            keys = file_keys(source, root, StatIndex.of_store(store), arguments["rehash"])
            failures = recorded_failures(store, root)
            fresh = data_rows(root, source, keys.keys, set(store.keys), failures, keys.stats)
            max_rows = row_bound(arguments["size_limit"], store.row_bytes, len(fresh.keys))
            if source.failed or not all(fresh.failed_keys):
                return Check(None, source, keys)  # new or unreadable files; the real run reports unread folders
            if holds_as_is(store, fresh, max_rows):
                other, rows = {}, np.arange(len(fresh.keys))
            else:
                plan = merge(store, fresh, arguments["retention"], max_rows)
                if not holds(store, plan):
                    return Check(None, source, keys)
                other, rows = plan.other, plan.data_rows
            config_key = store.config_key
    except FeatxError:
        return Check(None, source, keys)  # the real run reports it
    if keys.worth_recording:
        from .writer import record_file_stats

        record_file_stats(output, config, config_key, fresh, arguments["retention"], arguments["size_limit"])
    return Check(ExtractResult(
        store_path=output, n_items=len(fresh.keys), n_computed=0, n_reused=len(fresh.keys),
        n_failed=len(fresh.failed), seconds=time.perf_counter() - started, images_per_second=0.0,
        store_bytes=store_bytes(output), sealed=False, config=config, failed=fresh.failed, other=other, rows=rows,
        n_unchanged_failed=len(fresh.failed),
    ), source, keys)


def recorded_failures(store, root: str) -> dict[str, str]:
    """Content key -> reason of the files of data `root` that the store records as not decodable."""
    codes = {r for r, name in enumerate(store.roots) if name == root}
    return {str(key): reason for key, (_, reason), r in zip(store.failed_keys, store.failed, store.failed_roots.tolist())
            if key and r in codes}


def _same_weights(weights_file: str | None, config: dict) -> bool:
    """Whether the weights file the store was made from still has the content the store records."""
    if weights_file is None:
        return config.get("weights_sha256") is None
    try:
        return sha256_file(weights_file) == config.get("weights_sha256")
    except OSError:
        return False
