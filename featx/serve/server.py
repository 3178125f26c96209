"""Start-up and shutdown: check everything, bind the port, then serve with uvicorn until SIGTERM/Ctrl-C.

Bad heads, a locked or foreign cache store, a port in use: one FeatxError line before anything is served. On
SIGTERM uvicorn stops accepting connections and finishes the requests in flight (up to `GRACE_S`); then the
batchers drain and the cache store is sealed.
"""
from __future__ import annotations

import errno
import logging
import socket
import sys

from ..errors import FeatxError
from ..options import OptionError
from .options import ServeOptions

GRACE_S = 30


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (FeatxError when it is in use or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise OptionError("{port=}: address {host}:{port} is already in use", host=host, port=port) from None
        raise OptionError("{host=} {port=}: cannot listen there ({reason})", host=host, port=port,
                          reason=err.strerror or err) from None
    except (socket.gaierror, UnicodeError) as err:
        sock.close()
        raise OptionError("{host=}: not an address of this machine ({err})", host=host, err=err) from None
    sock.listen(2048)
    return sock


def serve(options: ServeOptions, log=None) -> None:
    """Run the service until it is stopped. `log` receives the one line that says where it listens."""
    import uvicorn

    from .app import create_app
    from .service import Service

    options.checked()
    logging.basicConfig(level=logging.WARNING, format="featx serve: %(levelname)s: %(message)s", stream=sys.stderr)
    service = Service(options)
    try:
        sock = bind(options.host, options.port)
    except FeatxError:
        service.close()
        raise
    failures: list[str] = []

    def failed(message: str) -> None:
        failures.append(message)
        server.should_exit = True

    config = uvicorn.Config(create_app(service, on_failure=failed), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACE_S, lifespan="on")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    if log is not None:
        names = ", ".join(service.registry.names())
        if service.search_stores:
            names += f"; search {', '.join(service.search_stores)}"
        log(f"featx serve: heads {names} on http://{host if ':' not in host else f'[{host}]'}:{port} (docs at /docs)")
    with sock:
        server.run(sockets=[sock])
    if failures:
        raise FeatxError(failures[0])


def start_process(args: list[str], timeout_s: float = 120.0, env: dict | None = None):
    """Run `featx serve ARGS --port 0` in a child process (for scripts, benchmarks and tests): returns the
    subprocess.Popen (stderr piped, text) and the base URL once /healthz answers 200."""
    import re
    import subprocess
    import time
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "featx", "serve", *args, "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stderr.readline()
    match = re.search(r" on (http://\S+):(\d+) ", line)
    deadline = time.monotonic() + timeout_s
    while match and proc.poll() is None and time.monotonic() < deadline:
        url = f"{match.group(1)}:{match.group(2)}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise FeatxError(f"featx serve did not become ready: {(line + proc.stderr.read()).strip()[-300:]}")
