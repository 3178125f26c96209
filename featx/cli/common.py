"""What every command shares: one-line errors with exit code 2, JSON output."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import click

from ..errors import FeatxError
from ..options import OptionError, flag_spelling


INTERRUPTED = "interrupted"  # ctx.meta key: what Ctrl-C left, set by the running command (on_interrupt)
RESUMABLE = "featx: interrupted (completed work is kept; run the same command again to resume)"
SPELLING = "spelling"  # ctx.meta key: how the running command spells an OptionError's parameters (spell_with)
# What Ctrl-C leaves behind, per command that keeps work (the others have written nothing: a head folder is written
# whole or not at all); a command may say more with on_interrupt.
LEFT_BY_INTERRUPT = {"extract": RESUMABLE, "predict": RESUMABLE, "advise": RESUMABLE, "neighbors": RESUMABLE}


class OneLineError(click.ClickException):
    """What every failure of the command line prints: `featx: error: ...` on one line, then the exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"featx: error: {self.format_message()}", err=True)


class FeatxGroup(click.Group):
    """A click group that turns FeatxError, click's usage errors (bad option values, missing arguments, unknown
    commands or options, of a command or of `featx` itself) and Ctrl-C into one line on stderr instead of a
    traceback or a usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:  # `featx` alone shows the help
            raise
        except click.UsageError as err:
            raise _usage_error(err, info_name) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OptionError as err:  # named by the keyword: the flag it came from
            command = self.commands.get(ctx.invoked_subcommand)
            spell = ctx.meta.get(SPELLING) or flag_spelling(command.params if command else ())
            raise OneLineError(err.spelled(spell), err.exit_code) from None
        except FeatxError as err:
            raise OneLineError(str(err), err.exit_code) from None
        except click.UsageError as err:
            raise _usage_error(err, ctx.command_path) from None
        except click.ClickException as err:  # click.open_file's FileError and the like: the user's path
            raise OneLineError(err.format_message()) from None
        except OSError as err:
            if err.errno != errno.ENAMETOOLONG:
                raise
            # Only a typed name is longer than the file system allows, and pathlib's exists() and is_dir() raise
            # it wherever such a name is first looked at: one line here rather than the same check in every command.
            raise OneLineError(f"{err.filename or 'a path'}: {err.strerror}") from None
        except KeyboardInterrupt:
            said = ctx.meta.get(INTERRUPTED) or LEFT_BY_INTERRUPT.get(ctx.invoked_subcommand,
                                                                      "featx: interrupted (nothing was written)")
            click.echo(said() if callable(said) else said, err=True)
            ctx.exit(130)


def _usage_error(err: click.UsageError, command: str) -> OneLineError:
    """`featx extract: Missing argument 'DATA'. (see featx extract --help)` and the like."""
    command = err.ctx.command_path if err.ctx is not None else command
    return OneLineError(f"{command}: {err.format_message()} (see {command} --help)", err.exit_code)


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
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as err:  # a name too long, a link that loops, a folder that cannot be searched
            raise FeatxError(f"{where}: {err.strerror or err}, expected {self.expected}") from None
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


def spell_with(spell) -> None:
    """Spell the running command's OptionErrors with `spell` (see featx.options.flag_spelling) instead of by its
    flags alone: for a flag that stands for several parameters of the Python call."""
    click.get_current_context().meta[SPELLING] = spell


def echo_json(data) -> None:
    """Print `data` as JSON on stdout (for --json)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"featx: warning: {message}", err=True)

