"""Heads fitted through the service: labelled rows from the cache, `fit_head` (C by CV) in a background thread,
the head folder written under --heads-dir and served as soon as it is complete. One fit at a time per head name;
a failed fit leaves the previous head serving."""
from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..store import write_store
from .errors import ServiceError

log = logging.getLogger("featx.serve")
FIT_OPTIONS = ("normalize", "grid", "folds", "class_weight", "val_split", "seed", "epochs", "hidden", "dropout",
               "neighbors", "temperature")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "r2", "mae", "rmse", "C", "rows", "fit_seconds")


def metrics_summary(metrics: dict) -> dict:
    """The headline numbers of a head's metrics.json."""
    return {name: metrics[name] for name in SUMMARY_METRICS if name in metrics}


@dataclass
class Job:
    """One background fit and its state: queued, running, succeeded or failed."""

    id: str
    name: str
    head: str
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    metrics: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Starts fits and keeps their jobs; the registry serves each head once its folder is written."""

    def __init__(self, registry, heads_dir: Path):
        self.registry = registry
        self.heads_dir = Path(heads_dir)
        self.jobs: dict[str, Job] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def check_request(self, name, kind, options) -> None:
        """Refuse a bad name, head type or option, or a name that is not ours to write (ServiceError)."""
        from ..heads.estimators import HEAD_TYPES

        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ServiceError(422, f"name {name!r}: expected 1-64 letters, digits, '.', '_' or '-'")
        if kind is not None and kind not in HEAD_TYPES:
            raise ServiceError(422, f"head {kind!r}: expected one of {', '.join(HEAD_TYPES)}")
        unknown = sorted(set(options) - set(FIT_OPTIONS))
        if unknown:
            raise ServiceError(422, f"options {', '.join(unknown)}: unknown; expected some of {', '.join(FIT_OPTIONS)}")
        served = self.registry.get(name)
        if served is not None and served.folder.resolve() != (self.heads_dir / name).resolve():
            raise ServiceError(409, f"head {name!r} is served from {served.source}, outside --heads-dir: choose "
                                    "another name")

    def start(self, name: str, kind: str | None, options: dict, config: dict, config_key: str, tap: str,
              keys: list[str], labels: list[str], rows: np.ndarray) -> Job:
        """Fit a head named `name` on `rows` (one per key) with class `labels`, in the background."""
        classes = sorted(set(labels))
        if len(classes) < 2:
            raise ServiceError(422, f"examples: all labelled {classes[0]!r}; a head needs 2 or more classes")
        with self._lock:
            if name in self._busy:
                raise ServiceError(409, f"head {name!r}: a fit is already running for it")
            self._busy.add(name)
            job = Job(id=uuid.uuid4().hex[:12], name=name, head=kind or "logistic")
            self.jobs[job.id] = job
        index = np.array([classes.index(label) for label in labels], dtype=np.int64)
        args = (job, kind, options, config, config_key, tap, keys, index, classes, rows)
        threading.Thread(target=self._fit, args=args, name=f"featx-fit-{name}", daemon=True).start()
        return job

    def _fit(self, job: Job, kind, options, config, config_key, tap, keys, labels, classes, rows) -> None:
        from ..heads.api import fit_head

        job.state, job.started = "running", time.time()
        try:
            self.heads_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.heads_dir, prefix=".examples-") as tmp:
                store = write_store(Path(tmp) / "examples.h5", config=config, config_key=config_key, keys=keys,
                                    paths=[f"examples/{key}" for key in keys], labels=labels, classes=classes,
                                    features={tap: rows})
                head = fit_head(store, tap, self.heads_dir / job.name, head=kind, overwrite=True, n_jobs=1,
                                **options)
            self.registry.add(job.name, self.heads_dir / job.name)
            job.metrics, job.state = metrics_summary(head.metrics), "succeeded"
        except FeatxError as err:
            job.error, job.state = str(err), "failed"
        except Exception as err:  # a fault of the fit, reported on the job; the previous head keeps serving
            log.exception("fit of head %s failed", job.name)
            job.error, job.state = f"internal error: {type(err).__name__}: {err}".splitlines()[0], "failed"
        finally:
            job.finished = time.time()
            with self._lock:
                self._busy.discard(job.name)
