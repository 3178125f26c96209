"""Every command of `featx` with hypothesis-drawn option values: never a traceback, exit code 0, 1, 2 or 130.

The commands and their options are read from the click group, so a new command or option is fuzzed without a line
here. Values are drawn by the option's type (choices and junk, numbers at and past every bound, huge and negative
numbers, floats such as nan and inf) and, for strings, from pools of names and paths: the data, a store, heads, a
run, masks, a text file, a text file named .jpg, an empty .h5, folders, missing and read-only places, empty strings,
unicode and over-long names. Each example runs in its own copy of a small world of tiny images, with `-b resnet18
-w none` drawn most of the time.

The test is about errors, not about long runs, so the options that decide how long a valid run takes are always
given, with cheap valid values or invalid ones: --epochs at most 2, --image-size 32 or a size too large to allocate,
--workers 0, 1 or 10**9 (never more processes than batches); numbers otherwise skip the middle range (a valid
--hidden 100000 would train for minutes, 10**9 fails at once). Two values are never drawn: `--engine ray` (starts a
Ray cluster) and `--compile` (a compiler warm-up of a minute); tests/test_ray_engine.py and the --compile tests
cover them. `featx serve` starts up, then stops before serving. The commands' `main` runs in this process (click's
CliRunner), each example in a time limit; a slow-marked sample runs real processes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from featx.cli import main
from imagegen import make_image_folder
from maskgen import make_mask_folder
from options_support import EXTRACT

EXAMPLES = int(os.environ.get("FEATX_FUZZ_EXAMPLES", "15"))  # per command; raise it for a longer search
ALLOWED_EXIT = {0, 1, 2, 130}
EXAMPLE_LIMIT_S = 300  # a hang is a failure too
COMMANDS = sorted(main.commands)

LONG = "x" * 300  # longer than a file name may be
JUNK = ["", " ", "ü", LONG, "-", "nan", "a,b", "\t"]


def pool(valid: list[str], wrong: list[str]) -> tuple[list[str], list[str]]:
    """What a user might type for one parameter: values it accepts, and mistakes."""
    return valid, wrong + JUNK


DATA = pool(["data", "data.csv", "data.txt", "data/ants", "masks", "store.h5"],
            ["missing", "notes.jpg", "notes.txt", "empty.h5", "data/ants/ants_000.png", "ro", "head"])
STORES = pool(["store.h5", "seg.h5", "out.h5"], ["data", "missing", "empty.h5", "notes.txt", "data.csv", "ro/new.h5",
                                                 "missing/deeper.h5", "head"])
OUTPUTS = pool(["out", "out.h5", "out.csv", "new/out"], ["data", "store.h5", "head", "ro/out.h5", "ro", "missing/x.h5",
                                                         "notes.txt", "ünï cødé/x.h5"])
HEADS = pool(["head", "seghead"], ["store.h5", "missing", "notes.txt", "run", "data"])
BACKBONES = pool(["resnet18"] * 6 + ["resnet50", "vit_b_16"], ["resnt18", "timm/no_such_model", "vgg"])
POOLS = {  # by the option's name (arguments as arg:NAME): the values a user would type there, right and wrong
    "arg:data": DATA, "arg:store": STORES, "arg:head": HEADS, "arg:heads": HEADS, "arg:backbone": BACKBONES,
    "arg:queries": pool(["data/ants/ants_000.png", "data", "data.csv", "data/bees"],
                        ["notes.jpg", "notes.txt", "missing", "store.h5", "ro"]),
    "output": OUTPUTS, "store": STORES, "cache": STORES, "search": STORES, "query_store": STORES,
    "backbone": BACKBONES,
    "weights": pool(["none"] * 4 + ["run/model.pt"], ["DEFAULT", "IMAGENET1K_V1", "notes.txt", "missing.pth", "store.h5",
                                                     "head", "data"]),
    "taps": pool(["flatten", "layer3", "fc", "avgpool", "layer1.0.conv1"], ["avgpol", "x", "layer9"]),
    "tap": pool(["flatten", "layer3", "layer4"], ["avgpol", "x", "fc"]),
    "device": pool(["cpu", "auto"], ["cuda", "cuda:3", "mps", "xpu"]),
    "split": pool(["train", "val"], ["test", "nope"]),
    "head": pool(["linear", "mlp:16", "mlp:16,0.2"], ["mlp:0", "mlp:-1", "mlp:x", "mlp:16,2", "mlp:16,nan"]),
    "freeze": pool(["none", "backbone", "until:layer2", "loaded", "layer1.*"], ["until:avgpol", "nothing*", "until:"]),
    "warmup": pool(["0", "1", "3steps"], ["-1", "1.5", "x", "nan", "10000000000000000000000steps"]),
    "decoder": pool(["conv:8", "linear"], ["conv:0", "conv:-3", "conv:x", "conv:1000000000000"]),
    "grid": pool(["0.1:10", "0.1,1", "1"], ["0", "-1", "10:0.1", "nan", "inf", "1e400", "x:y", "1:"]),
    "x": pool(["features/flatten"], ["items/label", "nope", "features"]),
    "y": pool(["items/label"], ["features/flatten", "nope", "items"]),
    "host": pool(["127.0.0.1", "localhost", "::1"], ["0.0.0.0", "999.1.1.1", "not a host", "::"]),
    "api_key_env": pool(["FEATX_FUZZ_KEY"], ["FEATX_FUZZ_UNSET"]),
    "ray_address": pool([], ["127.0.0.1:1", "x"]),  # only with --engine ray, never drawn
    "num_gpus_per_worker": pool([], ["0", "1", "-1", "nan"]),
    "decode_cache": pool(["auto", "none", "cachedir"], ["notes.txt", "ro/cache", "store.h5"]),
    "masks": pool(["masks"], ["data", "missing", "notes.txt", "store.h5"]),
    "init_head": pool(["head"], ["seghead", "missing", "notes.txt", "store.h5"]),
    "resume_dir": pool([], ["run", "missing", "head", "notes.txt", "out"]),  # -o is always given: a mistake
    "heads_dir": pool(["heads", "out"], ["run/model.pt", "notes.txt", "ro/heads"]),
    # the options that decide how long a valid run takes: always given, cheap when valid (huge sizes are refused)
    "epochs": pool(["1", "2"], ["0", "-1", "x"]),
    "image_size": pool(["32"] * 4 + ["8", "16", "100000", str(10**9), str(10**30)], ["7", "0", "-5", "x"]),
    "workers": pool(["0", "0", "1", str(10**9)], ["-1", "x"]),  # never more worker processes than batches
    "batch_size": pool(["1", "2", "4", "4", str(10**9), str(10**30)], ["0", "-1", "x"]),  # finetune's default: 32
}
ALWAYS = {"backbone", "weights", "epochs", "image_size", "workers", "batch_size", "output"}
NEVER = {"engine": ["ray"], "compile_model": None}  # values (None: the option itself) never drawn
HUGE = [str(10**9), str(2**31), str(2**63), str(10**30)]
FLOATS = ["0", "0.5", "1", "0.001"]  # plain floats a user would mean; the others are mistakes to catch
ODD_FLOATS = ["-1", "1e30", "1e-300", "nan", "inf", "-inf"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The files every example starts from (each example works on its own copy)."""
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root: Path) -> Path:
    """Tiny data, CSV and list, a store and a head on it, masks with a dense store and head, a finetuned run,
    non-image files, an empty .h5 and a read-only folder."""
    from featx import extract, fit_head, finetune
    from featx.segment.probe import fit_dense_probe

    make_image_folder(root / "data", per_class=4)
    rows = [f"data/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((root / "data").rglob("*.png"))]
    (root / "data.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (root / "data.txt").write_text("\n".join(row.split(",")[0] for row in rows) + "\n")
    (root / "notes.txt").write_text("not an image\n")
    (root / "notes.jpg").write_text("not an image either\n")
    (root / "empty.h5").write_bytes(b"")
    make_mask_folder(root / "masks", splits={"train": 4, "val": 2})
    extract(root / "data", root / "store.h5", taps=["layer3", "flatten"], **EXTRACT)
    fit_head(root / "store.h5", "flatten", root / "head", n_jobs=1, plots=False)
    extract(root / "masks", root / "seg.h5", taps=["layer3"], pooling="none", **EXTRACT)
    fit_dense_probe(root / "seg.h5", root / "masks", root / "seghead", tap="layer3", binary=True, n_jobs=1)
    finetune(root / "data", root / "run", epochs=1, decode_cache="none", **EXTRACT)
    (root / "heads").mkdir()
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    return root


@st.composite
def command_lines(draw, name: str) -> list[str]:
    """`featx NAME ...` words: the arguments (required ones always), the options that decide how long a run takes
    always, about a fifth of the others. Each value is one the option accepts, or a mistake: most examples have
    none, the others a drawn share of them. The choices come from a hypothesis-seeded random generator, so each is
    as likely as its share says (hypothesis's own integers lean towards their bounds)."""
    rng = draw(st.randoms(use_true_random=True))
    command = main.commands[name]
    wrong_share = rng.choice([0, 0, 0, 0.1, 0.3])

    def value(param) -> str | None:
        valid, wrong = _pool(param)
        if wrong and (not valid or rng.random() < wrong_share):
            return rng.choice(wrong)
        return rng.choice(valid) if valid else None

    words = [name]
    for param in command.params:
        if isinstance(param, click.Argument) and (param.required or rng.random() < 0.5):
            words += [value(param) for _ in range(1 if param.nargs == 1 else rng.randint(1, 2))]
    for param in command.params:
        if not isinstance(param, click.Option) or NEVER.get(param.name, ()) is None:
            continue
        if not (param.required or param.name in ALWAYS) and rng.random() > 0.2:
            continue
        if param.is_flag:
            words.append(rng.choice(param.opts + param.secondary_opts))
            continue
        for _ in range(rng.randint(1, 2) if param.multiple else 1):
            drawn = value(param)
            if drawn is not None:
                words += [rng.choice(param.opts), drawn]
    return words


def _pool(param: click.Parameter) -> tuple[list[str], list[str]]:
    """(accepted values, mistakes) for `param`: by its name when it has a pool and no choices, else by its type."""
    key = param.name if isinstance(param, click.Option) else f"arg:{param.name}"
    kind = param.type
    if key in POOLS and not isinstance(kind, click.Choice):  # a choice's values are its own (fit-head's --head)
        return POOLS[key]
    if isinstance(kind, click.Choice):
        return [str(c) for c in kind.choices if c not in NEVER.get(param.name, ())], JUNK
    if isinstance(kind, click.types.IntParamType):
        low = getattr(kind, "min", None)
        if low is None:
            return ["0", "1", "2"] * 3 + HUGE, ["-1", "1.5", "x", ""]
        return [str(low), str(low + 1), str(low + 2)] * 3 + HUGE, [str(low - 1), "-100", "1.5", "x", ""]
    if isinstance(kind, click.types.FloatParamType):
        low, high = getattr(kind, "min", None), getattr(kind, "max", None)
        values = FLOATS + ODD_FLOATS
        inside = [v for v in values if (low is None or float(v) >= low) and (high is None or float(v) < high)]
        sane = [v for v in inside if v in FLOATS]
        return sane or inside, [v for v in values if v not in sane] + ["x", "", "1,5"]
    return ["out", "data", "store.h5"], JUNK


class TooSlow(BaseException):
    """An example ran past EXAMPLE_LIMIT_S (a BaseException, so that no `except Exception` swallows it)."""


@contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def copy_of(world: Path):
    """A fresh copy of the world as the working folder (every drawn path is relative to it)."""
    scratch = Path(tempfile.mkdtemp(prefix="featx-fuzz-"))
    here = os.getcwd()
    try:
        shutil.copytree(world, scratch / "w", symlinks=True)
        os.chdir(scratch / "w")
        yield scratch / "w"
    finally:
        os.chdir(here)
        (scratch / "w" / "ro").chmod(0o755)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def no_serving(monkeypatch):
    """`featx serve` starts up (heads, extractors, cache store, socket) and then stops instead of serving."""
    pytest.importorskip("uvicorn")
    import uvicorn

    async def stop_at_once(self):
        return None

    monkeypatch.setattr(uvicorn.Server, "main_loop", stop_at_once)
    monkeypatch.setenv("FEATX_FUZZ_KEY", "s3cret")
    monkeypatch.delenv("FEATX_FUZZ_UNSET", raising=False)
    monkeypatch.setenv("FEATX_OFFLINE", "1")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, print_blob=True,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: the failing words are in the message
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.mark.parametrize("name", COMMANDS)
@FUZZ
@given(data=st.data())
def test_no_traceback_and_a_known_exit_code(cli, world, no_serving, name, data):
    words = data.draw(command_lines(name), label="featx")
    with copy_of(world), time_limit(EXAMPLE_LIMIT_S):
        result = cli(*words)
    shown = f"featx {' '.join(map(repr, words))} -> exit {result.exit_code}\n{result.output[-3000:]}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(shown) from result.exception
    assert result.exit_code in ALLOWED_EXIT, shown
    assert "Traceback" not in result.output, shown
    if result.exit_code == 2:
        assert result.output.strip().splitlines()[-1].startswith("featx: error: "), shown


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
@settings(FUZZ, max_examples=2)
@given(data=st.data())
def test_the_real_process_exits_the_same_way(featx_run, world, name, data):
    """A few drawn command lines as real `featx` processes: the interpreter's own exit path (signals, threads,
    buffered output) prints no traceback either. A server that came up is stopped with Ctrl-C."""
    words = data.draw(command_lines(name), label="featx")
    env = {"FEATX_FUZZ_KEY": "s3cret", "FEATX_OFFLINE": "1"}
    with copy_of(world) as folder:
        proc = featx_run(*words, wait=False, env=env, cwd=folder, stdout=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=EXAMPLE_LIMIT_S if name != "serve" else 60)
        except subprocess.TimeoutExpired:
            assert name == "serve", f"featx {words} still running after {EXAMPLE_LIMIT_S} s"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    shown = f"featx {' '.join(map(repr, words))} -> exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err + out, shown
    assert name == "serve" or proc.returncode in ALLOWED_EXIT, shown
