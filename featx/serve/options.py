"""The options of `featx serve`, spelled once (featx.options) and checked up front: a bad one is one line before
anything loads."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatxError
from ..options import OptionError, Options, option

EXTRA_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "multipart", "prometheus_client")


@dataclass(frozen=True)
class ServeOptions(Options):
    """What `featx serve` was asked to do: the heads (the command's arguments) and its options."""

    heads: tuple[str, ...] = option((), multiple=True)
    host: str = option("127.0.0.1", "--host", help="Address to listen on (loopback by default).")
    port: int = option(8000, "--port", low=0, high=65535, expected="0 to 65535", help="Port (0: any free one).")
    trust: bool = option(False, "--trust", help="Allow heads given as model.joblib pickles.")
    api_key_env: str | None = option(
        None, "--api-key-env", kind=str, metavar="VAR",
        help="Require the key read from $VAR, as 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (needed for a "
             "non-loopback --host).")
    max_batch: int = option(16, "--max-batch", low=1, help="Most images per forward pass.")
    max_wait_ms: float = option(5.0, "--max-wait-ms", low=0, high=10_000, expected="milliseconds from 0 to 10000",
                                help="How long a forward pass waits for more images to batch.")
    cache_items: int = option(10000, "--cache-items", low=1, help="Embeddings kept in memory (LRU).")
    cache: str | None = option(
        None, "--cache", kind=str, metavar="STORE",
        help="A featx store backing the cache: its rows answer without the backbone, new rows are added to it.")
    max_bytes: int = option(20_000_000, "--max-bytes", low=1, help="Largest request body (413).")
    heads_dir: str | None = option(
        None, "--heads-dir", kind=str, metavar="DIR",
        help="Where heads fitted through the service are written (and loaded from at start-up).")
    allow_training: bool = option(False, "--allow-training", help="Enable POST /v1/heads (fits on cached rows).")
    device: str = option("auto", "--device", help="auto | cpu | cuda[:N] | mps")
    search: tuple[str, ...] = option(
        (), "--search", multiple=True, metavar="STORE",
        help="A featx store served by POST /v1/search (nearest stored images); repeat for several.")
    weights: tuple[str, ...] = option(
        (), "-w", "--weights", multiple=True, metavar="FILE",
        help="A head's weights file that is no longer where the head recorded it (matched by sha256); repeat for "
             "several.")

    def __post_init__(self):
        super().__post_init__()
        if not self.api_key_env and not is_loopback(self.host):
            raise OptionError("{host=}: not a loopback address, so the server needs an API key ({api_key_env=VAR})",
                              host=self.host)
        if self.allow_training and not self.heads_dir:
            raise OptionError("{allow_training}: needs {heads_dir=DIR}, where fitted heads are written")

    @property
    def api_key(self) -> str | None:
        """The key requests must carry: the value of $api_key_env (None: no key is asked for)."""
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def checked(self) -> "ServeOptions":
        """Check what the options name on this machine: the API key's variable, the weights files, the heads
        folder. Returns self."""
        if self.api_key_env and self.api_key is None:
            raise OptionError("{api_key_env=}: that environment variable is unset or empty",
                              api_key_env=self.api_key_env)
        for file in self.weights:
            if not Path(file).is_file():
                raise OptionError("{weights=}: no such file, expected a weights file of a served head", weights=file)
        if self.heads_dir and Path(self.heads_dir).exists() and not Path(self.heads_dir).is_dir():
            raise OptionError("{heads_dir=}: is a file, expected a folder", heads_dir=self.heads_dir)
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
