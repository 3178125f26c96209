"""What every command shares: one-line errors with exit code 2, JSON output."""
from __future__ import annotations

import json
import sys

import click

from ..errors import FeatxError


class FeatxGroup(click.Group):
    """A click group that turns FeatxError (and Ctrl-C) into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatxError as err:
            click.echo(f"featx: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("featx: interrupted (completed work is kept; run the same command again to resume)", err=True)
            ctx.exit(130)


def echo_json(data) -> None:
    """Print `data` as JSON on stdout (for --json)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"featx: warning: {message}", err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
