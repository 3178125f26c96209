"""What every command shares: one-line errors with exit code 2, JSON output."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..errors import FeatxError


BACKBONE_HELP = ("torchvision model name, or timm/<name> for a timm model (pip install featx[timm]); featx layers "
                 "--list. Default: the backbone a -w file from featx finetune records, else resnet50.")
INTERRUPTED = "interrupted"  # ctx.meta key: what Ctrl-C left, set by the running command (on_interrupt)
RESUMABLE = "featx: interrupted (completed work is kept; run the same command again to resume)"
# What Ctrl-C leaves behind, per command that keeps work (the others have written nothing: a head folder is written
# whole or not at all); a command may say more with on_interrupt.
LEFT_BY_INTERRUPT = {"extract": RESUMABLE, "predict": RESUMABLE, "advise": RESUMABLE}


class FeatxGroup(click.Group):
    """A click group that turns FeatxError, click's usage errors (bad option values, missing arguments, unknown
    commands) and Ctrl-C into one line on stderr instead of a traceback or a usage block."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatxError as err:
            click.echo(f"featx: error: {err}", err=True)
            ctx.exit(err.exit_code)
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx is not None else ctx.command_path
            click.echo(f"featx: error: {command}: {err.format_message()} (see {command} --help)", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            said = ctx.meta.get(INTERRUPTED) or LEFT_BY_INTERRUPT.get(ctx.invoked_subcommand,
                                                                      "featx: interrupted (nothing was written)")
            click.echo(said() if callable(said) else said, err=True)
            ctx.exit(130)


class PathParam(click.ParamType):
    """A file path argument or option whose wrong kind is one line naming the option (exit code 2), like every
    other featx error, instead of click's usage block. kind 'input': an existing file; 'output': a file that can be
    written, in an existing folder that can be written (checked before any work). A folder is refused for both."""

    name = "path"

    def __init__(self, kind: str, expected: str):
        self.kind, self.expected = kind, expected

    def convert(self, value, param, ctx):
        path = Path(value)
        where = f"{param.opts[0] if isinstance(param, click.Option) else param.human_readable_name} {value}"
        if path.is_dir():
            raise FeatxError(f"{where}: is a folder, expected {self.expected}")
        if self.kind == "input" and not path.exists():
            raise FeatxError(f"{where}: no such file, expected {self.expected}")
        if self.kind == "output":
            check_writable(where, path, self.expected)
        return str(value)


def check_writable(where: str, path: Path, expected: str) -> None:
    """FeatxError (one line starting with `where`) unless `path` can be written: an existing folder that this
    process may write to holds it, and an existing file there is writable too."""
    folder = path.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FeatxError(f"{where}: {folder} {problem}, expected {expected} in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FeatxError(f"{where}: cannot write in {folder} (read-only), expected {expected} in a folder you can write")
    if path.exists() and not os.access(path, os.W_OK):
        raise FeatxError(f"{where}: the file is read-only, expected {expected} that can be written")


def on_interrupt(said) -> None:
    """What Ctrl-C prints for the running command: a line, or a function that gives it at that moment."""
    click.get_current_context().meta[INTERRUPTED] = said


def echo_json(data) -> None:
    """Print `data` as JSON on stdout (for --json)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"featx: warning: {message}", err=True)

