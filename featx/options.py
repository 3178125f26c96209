"""A command's options spelled once: one dataclass whose fields carry their flags, type, range and help.

A field made with `option(default, *flags, ...)` is an option of the command (no flags: of the Python call only).
From the dataclass come the click options of the command (`Options.click_options`: types and choices, the range
in the help), the check of every value when an instance is built (`__post_init__`: an OptionError naming the
keyword, `workers=-1: expected an integer from 0 to 64`), and the plain dict a run records (`Options.to_dict`).
Ranges are checked there alone, so a Python call and the command line read the same words.

An OptionError names the parameters it is about as format fields, `{name}`, `{name=}` (with the value given),
`{name=$key}` or `{name=text}`: a Python caller reads `workers=-1`, and the command line (featx.cli.common) reads
the flag the value came from, `--workers -1` (`flag_spelling`). Click checks values only while it parses and
dataclasses check none, hence this small module.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import numbers
import shlex
from dataclasses import dataclass, field

import click

from .errors import FeatxError

SPEC = "featx.option"  # the key of a field's Spec in its metadata


class _Named:
    """A message that names parameters: `template` names each as `{name}` (the parameter), `{name=}` (the
    parameter and the value in `values[name]`), `{name=$key}` (the parameter and the value in `values[key]`) or
    `{name=text}` (the parameter set to `text`, read as a Python literal where it is one: `{num_shards=4}`); the
    other fields are filled from `values` as str.format does, so a parameter with a value in `values[name]` is
    always written with `=` (`{name=$key}` lets a message name it bare too)."""

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.spelled(_keyword))

    def spelled(self, spell) -> str:
        """The message with each parameter written by `spell(name, value)` (value: the given one, or MISSING)."""
        return self.template.format_map(_Spelling(self.values, spell))


class OptionError(_Named, FeatxError):
    """A bad value of one or more parameters (the message names them as _Named says)."""

    def __reduce__(self):  # pickled whole (a Ray worker's error reaches the driver with its fields)
        return _option_error, (self.template, self.values)


class OptionWarning(_Named, UserWarning):
    """A warning that names parameters as an OptionError does (the command line shows their flags)."""


def _option_error(template: str, values: dict) -> OptionError:
    return OptionError(template, **values)


class _Spelling:
    """The mapping str.format_map reads an OptionError's fields from."""

    def __init__(self, values: dict, spell):
        self.values, self.spell = values, spell

    def __getitem__(self, key: str):
        name, has_value, literal = key.partition("=")
        if has_value:
            value = self.values[literal[1:]] if literal.startswith("$") else _literal(literal) if literal else \
                self.values[name]
            return self.spell(name, value)
        if key in self.values:
            return self.values[key]
        return self.spell(key, dataclasses.MISSING)


def _literal(text: str):
    """The value `{name=text}` stands for: a number or a constant where `text` reads as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _keyword(name: str, value) -> str:
    """How a Python caller reads a parameter: `workers`, `workers=-1`."""
    return name if value is dataclasses.MISSING else f"{name}={value!r}"


def flag_spelling(params):
    """How a command-line user reads a parameter of a command whose click parameters are `params`: the value as it
    would be typed after its flag (`--workers -1`, `--pooling ''`, `-l a -l b` for a repeated option), a switch as
    the switch alone (`--overwrite` for True, `--no-plots`, `--prune` for the value it sets), an argument as its
    value alone (its name, `DATA`, when no value is given); a parameter the command lacks, or a value no flag
    gives, is written as a Python caller reads it."""
    by_name = {param.name: param for param in params}

    def spell(name: str, value) -> str:
        param = by_name.get(name)
        if param is None:
            return _keyword(name, value)
        if isinstance(param, click.Argument):
            return param.human_readable_name if value is dataclasses.MISSING else _typed(value)
        if value is dataclasses.MISSING:
            return param.opts[0]
        if param.is_bool_flag and isinstance(value, bool):
            switch = param.opts[0] if value else next(iter(param.secondary_opts), None)
            return switch or _keyword(name, value)
        if param.is_flag:
            return param.opts[0] if value == param.flag_value else _keyword(name, value)
        if param.multiple and isinstance(value, (list, tuple)):
            return " ".join(f"{param.opts[0]} {_typed(item)}" for item in value)
        return f"{param.opts[0]} {_typed(value)}"

    return spell


def _typed(value) -> str:
    """A value as a shell user types it."""
    return shlex.quote(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Spec:
    """How one option is spelled on the command line and which values it takes. `low`/`high` may be callables
    (bounds that depend on the machine), evaluated when they are used."""

    flags: tuple[str, ...]
    kind: type | None  # int, float, bool or str; None: any value (checked where it is used)
    help: str | None = None
    choices: tuple | None = None
    low: object = None
    high: object = None
    low_open: bool = False
    high_open: bool = False
    multiple: bool = False
    metavar: str | None = None
    click_type: object = None  # a click type that replaces the one made from kind and choices
    flag_value: object = None  # a flag that sets this value (the default stays the field's default)
    note: object = None  # said after the expected range: text or a callable giving it
    expected: str | None = None  # what an error says is expected, instead of the range in words
    optional: bool = False  # None is taken too (it always is where the default is None)

    def bounds(self) -> tuple:
        return tuple(bound() if callable(bound) else bound for bound in (self.low, self.high))


def option(default, *flags: str, kind: type | None = None, multiple: bool = False, metadata: dict | None = None,
           **spec):
    """A dataclass field that is an option: `flags` on the command line (none: Python callers only), `kind` taken
    from the default unless given (or from `choices`), the other Spec attributes as keywords; `metadata` adds
    entries of the caller's own."""
    if kind is None and not multiple and spec.get("choices") is None and default is not None:
        kind = type(default)
    return field(default=default, metadata={SPEC: Spec(tuple(flags), kind, multiple=multiple, **spec),
                                            **(metadata or {})})


SEGMENT = {"fits": "segment"}  # metadata of an option that only segmentation runs take


def binary_mask_option(help: str = "segment: every non-zero mask pixel is foreground."):
    """--binary of the commands that read masks."""
    return option(False, "--binary", metadata=SEGMENT, help=help)


def num_classes_option():
    """--num-classes of the commands that read masks."""
    return option(None, "--num-classes", kind=int, low=1, metadata=SEGMENT,
                  help="segment: mask ids are 0 (background) to this (default: the largest id found).")


class Options:
    """The base of a command's options dataclass (a frozen dataclass whose fields are made with `option`)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), f.default, f.metadata[SPEC])

    @classmethod
    def names(cls, **metadata) -> list[str]:
        """The fields' names, in order; with `metadata`, those whose metadata holds these entries (missing: None)."""
        return [f.name for f in dataclasses.fields(cls)
                if all(f.metadata.get(key) == wanted for key, wanted in metadata.items())]

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def of(cls, arguments: dict):
        """The options among `arguments` (a call's keywords; other entries are left out), checked."""
        return cls(**{name: arguments[name] for name in cls.names() if name in arguments})

    @classmethod
    def from_command_line(cls, params: dict):
        """The options among the parameters click parsed (a repeatable option given no times: its default); a
        value out of range is a click.UsageError naming the flag, as click's own types would raise."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        try:
            return cls(**{name: (list(value) or fields[name].default) if fields[name].metadata[SPEC].multiple
                          else value for name, value in params.items() if name in fields})
        except OptionError as err:
            ctx = click.get_current_context(silent=True)
            raise click.UsageError(err.spelled(flag_spelling(ctx.command.params if ctx else ())), ctx) from None

    @classmethod
    def click_options(cls, command=None, **types):
        """Decorate a click command with one option per field that has flags, in the fields' order; `types` (by
        field name) replace the click types made from the fields, for the command line's own checks such as a
        path's (used as `@Options.click_options(store=PathParam(...))`)."""
        if command is None:
            return lambda command: cls.click_options(command, **types)
        for f in reversed(dataclasses.fields(cls)):
            spec = f.metadata[SPEC]
            if spec.flags:
                settings = _click_settings(f.default, spec)
                if f.name in types:
                    settings["type"] = types[f.name]
                command = click.option(*spec.flags, f.name, **settings)(command)
        return command

    def to_dict(self) -> dict:
        """The options as plain values (tuples as lists), as a run records them."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}


def _click_settings(default, spec: Spec) -> dict:
    """click.option's keywords for a field. A number's range is checked when the options are built, not by click,
    so that the command line and a Python call read the same words; the help shows it as click would."""
    settings = {"help": _with_range(spec), "metavar": spec.metavar, "multiple": spec.multiple}
    if spec.flag_value is not None:
        return {**settings, "flag_value": spec.flag_value, "default": default}
    if spec.kind is bool and "/" not in spec.flags[0]:
        return {**settings, "is_flag": True, "default": default}
    kind = spec.click_type or _click_type(spec)
    shown = default is not None and default is not False and not spec.multiple
    if spec.multiple and isinstance(default, str):  # given no times: the field's default (from_command_line)
        default = None
    return {**settings, "type": kind, "default": default, "show_default": shown}


def _click_type(spec: Spec):
    if spec.choices is not None:
        return click.Choice([str(c) for c in spec.choices])
    return spec.kind if spec.kind in (int, float) else None


def _with_range(spec: Spec) -> str | None:
    """The help with a number's range after it, `[0<=x<=8]`."""
    low, high = spec.bounds() if spec.kind in (int, float) else (None, None)
    if low is None and high is None:
        return spec.help
    below, above = ("<" if spec.low_open else "<="), ("<" if spec.high_open else "<=")
    if high is None:
        shown = f"x{'>' if spec.low_open else '>='}{low}"
    else:
        shown = f"x{above}{high}" if low is None else f"{low}{below}x{above}{high}"
    return f"{spec.help or ''}  [{shown}]".lstrip()


def check_value(name: str, value, default, spec: Spec) -> None:
    """OptionError unless `value` is one the option takes (None: where the default is None)."""
    if value is None and (default is None or spec.optional):
        return
    if spec.multiple:
        items = [value] if isinstance(value, str) else _items(value)
        if not all(isinstance(item, str) for item in items):
            raise OptionError("{%s=}: expected a name or a list of names" % name, **{name: value})
        for item in items if spec.choices is not None else ():
            _check_choice(name, item, spec.choices)
        return
    if spec.choices is not None:
        _check_choice(name, value, spec.choices)
        return
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise OptionError("{%s=}: expected True or False" % name, **{name: value})
    elif spec.kind in (int, float):
        _check_number(name, value, spec)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise OptionError("{%s=}: expected one of {choices}" % name, **{name: value},
                          choices=", ".join(map(str, choices)))


def _items(value) -> list:
    try:
        return list(value)
    except TypeError:
        return [None]


def _check_number(name: str, value, spec: Spec) -> None:
    whole = spec.kind is int
    low, high = spec.bounds()
    fits = (isinstance(value, numbers.Integral if whole else numbers.Real) and not isinstance(value, bool)
            and (whole or math.isfinite(value))
            and (low is None or (value > low if spec.low_open else value >= low))
            and (high is None or (value < high if spec.high_open else value <= high)))
    if fits:
        return
    what = "an integer" if whole else "a number"
    if spec.expected is not None:
        expected = spec.expected
    elif low is not None and high is not None:
        left, right = "(" if spec.low_open else "[", ")" if spec.high_open else "]"
        expected = (f"{what} from {low} to {high}" if whole else f"{what} in {left}{low:g}, {high:g}{right}")
    elif low is not None:
        expected = f"{what} greater than {low:g}" if spec.low_open else f"{what} >= {low:g}"
    elif high is not None:
        expected = f"{what} less than {high:g}" if spec.high_open else f"{what} <= {high:g}"
    else:
        expected = what if whole else "a finite number"
    note = spec.note() if callable(spec.note) else spec.note
    raise OptionError("{%s=}: expected {expected}" % name, **{name: value},
                      expected=f"{expected} ({note})" if note else expected)
