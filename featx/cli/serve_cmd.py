"""`featx serve`: parse the options and start the service (featx/serve/)."""
from __future__ import annotations

import click

from .common import on_interrupt


@click.command("serve")
@click.argument("heads", nargs=-1, required=True, metavar="HEAD_DIR [HEAD_DIR...]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: any free one).")
@click.option("--trust", is_flag=True, help="Allow heads given as model.joblib pickles.")
@click.option("--api-key-env", metavar="VAR", help="Require the key read from $VAR, as 'Authorization: Bearer <key>' "
                                                   "or 'X-API-Key: <key>' (needed for a non-loopback --host).")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Most images per forward pass.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=float,
              help="How long a forward pass waits for more images to batch.")
@click.option("--cache-items", default=10000, show_default=True, type=int, help="Embeddings kept in memory (LRU).")
@click.option("--cache", "cache_store", metavar="STORE", help="A featx store backing the cache: its rows answer "
                                                              "without the backbone, new rows are added to it.")
@click.option("--max-bytes", default=20_000_000, show_default=True, type=int, help="Largest request body (413).")
@click.option("--heads-dir", metavar="DIR", help="Where heads fitted through the service are written (and "
                                                 "loaded from at start-up).")
@click.option("--allow-training", is_flag=True, help="Enable POST /v1/heads (fits on cached rows).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N] | mps")
@click.option("-w", "--weights", multiple=True, metavar="FILE", help="A head's weights file that is no longer where "
                                                                      "the head recorded it (matched by sha256); repeat for several.")
def serve(heads, host, port, trust, api_key_env, max_batch, max_wait_ms, cache_items, cache_store, max_bytes,
          heads_dir, allow_training, device, weights):
    """Serve fitted heads and their embeddings over HTTP (needs the serve extra: pip install 'featx[serve]').

    \b
    featx serve pets-head/ --port 8000
    curl -F file=@cat.jpg http://127.0.0.1:8000/v1/heads/pets-head/predict
    """
    from ..serve.options import ServeOptions, check_extra

    check_extra()
    from ..serve.server import serve as run

    options = ServeOptions(
        heads=list(heads), host=host, port=port, trust=trust, api_key_env=api_key_env, max_batch=max_batch,
        max_wait_ms=max_wait_ms, cache_items=cache_items, cache=cache_store, max_bytes=max_bytes,
        heads_dir=heads_dir, allow_training=allow_training, device=device, weights=list(weights),
    )
    kept = f"the new embeddings are sealed into {cache_store}" if cache_store else "nothing to resume"
    on_interrupt(f"featx serve: stopped after answering the requests in flight ({kept})")
    run(options, log=lambda line: click.echo(line, err=True))


COMMANDS = [serve]
