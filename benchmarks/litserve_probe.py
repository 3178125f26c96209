"""Why featx serve is not built on LitServe: two behaviours of LitServe's batching server, measured.

Starts a LitServe server (max_batch_size=8, batch_timeout=0.2 s) whose decode_request refuses negative inputs
with a 422, sends 8 concurrent requests of which one is bad, and counts the good requests that failed with it;
then sends a raw image/jpeg body. Run: python benchmarks/litserve_probe.py (needs litserve, httpx).
"""
from __future__ import annotations

import concurrent.futures as cf
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

SERVER = textwrap.dedent('''
    import sys
    import litserve as ls
    from fastapi import HTTPException

    class API(ls.LitAPI):
        def setup(self, device):
            pass

        def decode_request(self, request):
            if request["x"] < 0:
                raise HTTPException(422, "negative input")
            return request["x"]

        def predict(self, xs):
            return [x * 2 for x in xs]

    if __name__ == "__main__":
        ls.LitServer(API(max_batch_size=8, batch_timeout=0.2), accelerator="cpu").run(
            host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False, log_level="critical")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import litserve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "server.py"
        script.write_text(SERVER)
        proc = subprocess.Popen([sys.executable, str(script), str(port)], stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            xs = [1, 2, 3, -1, 5, 6, 7, 8]
            with cf.ThreadPoolExecutor(len(xs)) as pool:
                answers = list(pool.map(lambda x: httpx.post(url + "/predict", json={"x": x}, timeout=30), xs))
            good = [a.status_code for x, a in zip(xs, answers) if x >= 0]
            raw = httpx.post(url + "/predict", content=b"\xff\xd8\xff\xe0 jpeg bytes",
                             headers={"content-type": "image/jpeg"}, timeout=30)
        finally:
            proc.send_signal(2)
            proc.wait(30)
    print(f"litserve {litserve.__version__}")
    print(f"good requests sharing a batch with one bad request: {len(good)}, failed with it: "
          f"{sum(s != 200 for s in good)} (statuses {[a.status_code for a in answers]})")
    print(f"raw image/jpeg body: HTTP {raw.status_code} {raw.text[:60]}")


if __name__ == "__main__":
    main()
