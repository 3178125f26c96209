"""The options of `featx serve`, checked up front: a bad one is one FeatxError line before anything loads."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FeatxError

EXTRA_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "multipart", "prometheus_client")


@dataclass
class ServeOptions:
    """What `featx serve` was asked to do (the CLI's options, one field each)."""

    heads: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    trust: bool = False
    api_key_env: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    cache_items: int = 10000
    cache: str | None = None
    max_bytes: int = 20_000_000
    heads_dir: str | None = None
    allow_training: bool = False
    device: str = "auto"
    weights: list[str] = field(default_factory=list)  # -w: heads' weights files that moved
    api_key: str | None = field(default=None, repr=False)

    def checked(self) -> "ServeOptions":
        """Check every option; read the API key from its environment variable. Returns self."""
        positive = [("--max-batch", self.max_batch), ("--cache-items", self.cache_items),
                    ("--max-bytes", self.max_bytes)]
        for option, value in positive:
            if not isinstance(value, int) or value < 1:
                raise FeatxError(f"{option} {value!r}: expected a positive integer")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise FeatxError(f"--max-wait-ms {self.max_wait_ms!r}: expected milliseconds from 0 to 10000")
        if not 0 <= self.port <= 65535:
            raise FeatxError(f"--port {self.port}: expected 0 to 65535")
        if self.api_key_env:
            self.api_key = os.environ.get(self.api_key_env) or None
            if self.api_key is None:
                raise FeatxError(f"--api-key-env {self.api_key_env}: that environment variable is unset or empty")
        elif not is_loopback(self.host):
            raise FeatxError(
                f"--host {self.host}: not a loopback address, so the server needs an API key (--api-key-env VAR)"
            )
        for file in self.weights:
            if not Path(file).is_file():
                raise FeatxError(f"-w {file}: no such file, expected a weights file of a served head")
        if self.allow_training and not self.heads_dir:
            raise FeatxError("--allow-training: needs --heads-dir DIR, where fitted heads are written")
        if self.heads_dir and Path(self.heads_dir).exists() and not Path(self.heads_dir).is_dir():
            raise FeatxError(f"--heads-dir {self.heads_dir}: is a file, expected a folder")
        return self


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_extra() -> None:
    """One line naming the extra when the serving packages are missing."""
    import importlib.util

    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise FeatxError(
            f"featx serve needs the serve extra ({', '.join(missing)} not installed): pip install 'featx[serve]'"
        )
