"""`featx serve`: parse the options and start the service (featx/serve/)."""
from __future__ import annotations

import click

from ..serve.options import ServeOptions
from .common import on_interrupt


@click.command("serve")
@click.argument("heads", nargs=-1, required=True, metavar="HEAD_DIR [HEAD_DIR...]")
@ServeOptions.click_options
def serve(**params):
    """Serve fitted heads and their embeddings over HTTP (needs the serve extra: pip install 'featx[serve]').

    \b
    featx serve pets-head/ --port 8000
    curl -F file=@cat.jpg http://127.0.0.1:8000/v1/heads/pets-head/predict
    """
    from ..serve.options import check_extra

    check_extra()
    options = ServeOptions.from_command_line(params)
    from ..serve.server import serve as run

    kept = f"the new embeddings are sealed into {options.cache}" if options.cache else "nothing to resume"
    on_interrupt(f"featx serve: stopped after answering the requests in flight ({kept})")
    run(options, log=lambda line: click.echo(line, err=True))


COMMANDS = [serve]
