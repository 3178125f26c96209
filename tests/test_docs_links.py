"""The documentation holds together: every relative link in README.md, docs/*.md and benchmarks/README.md leads to a
file of the repository (and to one of its headings when it names an anchor, by GitHub's anchor rules), and every
`featx ...` line in their shell code blocks parses with the real command line: featx's click group resolves the
command, and click parses the options and converts their values, without running anything.

Markdown is read with markdown-it-py (CommonMark plus tables), so a link inside code is not a link and a fence is a
fence. Written here, because no installed library does them: GitHub's heading anchors, and the reading of a shell
line (a `$ ` prompt, `\\` continuations, `#` comments, `&&` chains, `VAR=value` prefixes, `torchrun ... -m featx`).
"""
from __future__ import annotations

import re
import shlex
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlsplit

import click
from markdown_it import MarkdownIt

from featx.cli import main
from featx.cli.common import PathParam

ROOT = Path(__file__).resolve().parents[1]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
SHELL_OPERATORS = re.compile(r"^[();<>|&]+$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
MENTIONS_FEATX = re.compile(r"(^|[\s/])featx(\s|$)")  # a line that may run featx; other lines of a block need not be shell
LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")  # GitHub's anchors into a code file's lines


def documentation_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def parse_markdown(text: str) -> list:
    return MarkdownIt("commonmark").enable("table").parse(text)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: the heading's text in lower case, without punctuation (letters,
    digits, `_`, `-` and spaces stay), spaces turned into `-`; a repeated anchor gets `-1`, `-2`, ..."""
    tokens, anchors, seen = parse_markdown(page.read_text(encoding="utf-8")), set(), {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def source_line(lines: list[str], block: list[int] | None, needle: str) -> int:
    """The 1-based line of the block's source that holds `needle` (its first line when none does)."""
    start, end = block or (0, 1)
    for number in range(start, end):
        if needle in lines[number]:
            return number + 1
    return start + 1


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image in the page, as written."""
    text = page.read_text(encoding="utf-8")
    lines, found = text.split("\n"), []
    for token in parse_markdown(text):
        for child in token.children or []:
            target = {"link_open": child.attrGet("href"), "image": child.attrGet("src")}.get(child.type)
            if target is not None:
                found.append((source_line(lines, token.map, unquote(target)), unquote(target)))
    return found


def link_problem(page: Path, target: str) -> str | None:
    """Why the relative link `target` from `page` leads nowhere; None for a link that resolves or is not relative."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    path = (page.parent / parts.path).resolve() if parts.path else page
    if not path.is_relative_to(ROOT):
        return f"link {target}: leads outside the repository"
    if not path.exists():
        return f"link {target}: no such file or folder {path.relative_to(ROOT)}"
    if not parts.fragment:
        return None
    if path.suffix != ".md":
        if LINE_ANCHOR.match(parts.fragment):
            return None
        return f"link {target}: #{parts.fragment} is not a line anchor of {path.relative_to(ROOT)}"
    if parts.fragment not in heading_anchors(path):
        return f"link {target}: {path.relative_to(ROOT)} has no heading whose anchor is #{parts.fragment}"
    return None


def shell_lines(page: Path) -> list[tuple[int, str]]:
    """(line, command) of the shell code blocks: continuations joined; where a block shows `$ ` prompts, only the
    prompted lines (the others are output)."""
    found = []
    for token in parse_markdown(page.read_text(encoding="utf-8")):
        if token.type != "fence" or token.info.strip().split(" ")[0] not in SHELL_FENCES:
            continue
        rows = token.content.rstrip("\n").split("\n")
        prompted = any(row.lstrip().startswith("$ ") for row in rows)
        first_line = token.map[0] + 2  # the line after the opening fence, 1-based
        command, start = "", None
        for offset, row in enumerate(rows):
            if start is None:
                if prompted and not row.lstrip().startswith("$ "):
                    continue
                start, row = first_line + offset, row.lstrip().removeprefix("$ ")
            if row.endswith("\\"):
                command += row[:-1] + " "
                continue
            found.append((start, command + row))
            command, start = "", None
    return found


def featx_invocations(command: str) -> list[list[str]]:
    """The arguments given to featx by each `featx ...` (or `... -m featx ...`) in a shell line; `...` stands for the
    options a line leaves out and is dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    segments, segment = [], []
    for word in lexer:
        if SHELL_OPERATORS.match(word):
            segments.append(segment)
            segment = []
        else:
            segment.append(word)
    segments.append(segment)
    invocations = []
    for words in segments:
        while words and ASSIGNMENT.match(words[0]):
            words = words[1:]
        module = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "featx"]), None)
        if words and Path(words[0]).name == "featx":
            arguments = words[1:]
        elif module is not None:
            arguments = words[module + 2:]
        else:
            continue
        invocations.append([word for word in arguments if word != "..."])
    return invocations


@contextmanager
def example_values():
    """Parameter types convert values as on a real run, except that a path need not exist (an example names the
    reader's files) and a word holding `$VARIABLE` stands for whatever value the variable holds."""
    convert = click.ParamType.__call__

    def lenient(self, value, param=None, ctx=None):
        if isinstance(self, (click.Path, PathParam)) or (isinstance(value, str) and "$" in value):
            return value
        return convert(self, value, param, ctx)

    with mock.patch.object(click.ParamType, "__call__", lenient):
        yield


def parse_problem(arguments: list[str]) -> str | None:
    """Why featx's command line refuses `featx ARGUMENTS`; None when it parses. Nothing is run."""
    try:
        with example_values(), main.make_context("featx", list(arguments)) as ctx:
            rest = [*ctx._protected_args, *ctx.args]  # what follows featx's own options, as click's completion reads it
            if not rest:
                return None
            if main.get_command(ctx, rest[0]) is None:
                return f"unknown command {rest[0]!r} (featx has: {', '.join(main.list_commands(ctx))})"
            name, command, rest = main.resolve_command(ctx, rest)
            command.make_context(name, rest, parent=ctx).close()
    except click.exceptions.Exit:  # --help, --version
        return None
    except click.ClickException as err:
        return err.format_message()
    return None


def test_every_relative_link_resolves():
    problems = [f"{page.relative_to(ROOT)}:{line}: {problem}"
                for page in documentation_pages() for line, target in links(page)
                if (problem := link_problem(page, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_featx_line_parses_with_the_real_command_line():
    problems, parsed = [], 0
    for page in documentation_pages():
        for line, command in shell_lines(page):
            if not MENTIONS_FEATX.search(command):
                continue
            try:
                invocations = featx_invocations(command)
            except ValueError as err:
                problems.append(f"{page.relative_to(ROOT)}:{line}: cannot read as a shell line ({err}): {command}")
                continue
            for arguments in invocations:
                parsed += 1
                if (problem := parse_problem(arguments)):
                    problems.append(f"{page.relative_to(ROOT)}:{line}: featx {' '.join(arguments)}\n    {problem}")
    assert not problems, "featx lines the command line refuses:\n" + "\n".join(problems)
    assert parsed >= 20, f"only {parsed} featx lines found in the documentation's shell blocks"


# The checks themselves, on pages made to fail.

def test_a_missing_file_or_anchor_is_named():
    page = ROOT / "docs" / "x.md"
    assert link_problem(page, "../README.md") is None
    assert "no such file" in link_problem(page, "../no-such-page.md")
    assert "has no heading whose anchor is #no-such-heading" in link_problem(page, "../README.md#no-such-heading")
    assert "outside the repository" in link_problem(page, "../../elsewhere.md")
    assert link_problem(page, "https://example.com/missing.md") is None
    assert link_problem(ROOT / "README.md", "featx/cli/common.py#L10-L20") is None


def test_github_anchors(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Store schema (version 1)\n\n## `featx serve` and the cache\n\n## Notes\n\n## Notes\n\n"
                    "```bash\n# not a heading\n```\n")
    assert heading_anchors(page) == {"store-schema-version-1", "featx-serve-and-the-cache", "notes", "notes-1"}


def test_links_are_found_with_their_lines_but_not_inside_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Intro.\n\nSee [the store](docs/store-format.md#schema)\nand `[not](a-link.md)`.\n\n"
                    "| a | b |\n| --- | --- |\n| [cell](docs/cell.md) | x |\n\n```\n[x](fenced.md)\n```\n")
    assert links(page) == [(3, "docs/store-format.md#schema"), (8, "docs/cell.md")]


def test_shell_lines_follow_prompts_continuations_and_chains(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("```bash\nfeatx extract data/ \\\n  -o s.h5   # a comment\npython -c 'x'\n```\n\n"
                    "```\n$ featx info s.h5\nfeatx output line that is not a command\n```\n\n"
                    "```python\nfeatx.extract('x')\n```\n")
    lines = shell_lines(page)
    assert [line for line, _ in lines] == [2, 4, 8]
    assert featx_invocations(lines[0][1]) == [["extract", "data/", "-o", "s.h5"]]
    assert featx_invocations(lines[2][1]) == [["info", "s.h5"]]
    assert featx_invocations('W=1 .venv/bin/pip install x && .venv/bin/featx layers resnet18 | head') == [["layers", "resnet18"]]
    assert featx_invocations("torchrun --nproc-per-node 4 -m featx finetune data/ -o runs/x/ ...") == [["finetune", "data/", "-o", "runs/x/"]]


def test_the_parser_names_what_it_refuses():
    assert parse_problem(["extract", "data/", "-b", "resnet18", "-o", "s.h5"]) is None
    assert parse_problem(["extract", "data/", "-o", "s.h5", "--shard-index", "$SLURM_ARRAY_TASK_ID", "--num-shards", "4"]) is None
    assert parse_problem(["fit-head", "missing.h5", "-o", "head/"]) is None  # paths need not exist
    assert "unknown command 'exprot'" in parse_problem(["exprot", "s.h5"])
    assert "--no-such-option" in parse_problem(["extract", "data/", "-o", "s.h5", "--no-such-option"])
    assert "'avgg'" in parse_problem(["extract", "data/", "-o", "s.h5", "--pooling", "avgg"])
    assert "-o" in parse_problem(["extract", "data/"])  # a required option left out
    assert "requires an argument" in parse_problem(["fit-head", "s.h5", "-o"])
    assert "unexpected extra argument" in parse_problem(["info", "a.h5", "b.h5"])
    assert "'x'" in parse_problem(["extract", "data/", "-o", "s.h5", "--batch-size", "x"])
