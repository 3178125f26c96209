"""Shared by every test: torch runs on one intra-op thread, measured pipeline costs stay in the session's folder,
featx subprocesses can be interrupted with Ctrl-C, tests marked `cuda` skip without a CUDA device, and the fixtures that run featx (`cli`, `featx_run`) or make images
(`image_folder`, `image_folders`, `images`).

Tiny tensors are fastest on one thread, and several times faster on a busy machine, where idle OpenMP threads spin
for a core. The reliability suite keeps torch's default, because it compares in-process runs with real `featx`
subprocesses bit for bit, and the thread count changes the order of float reductions."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import cli_support
from imagegen import make_image, make_image_folder


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    if "reliability" in request.path.parts:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def tuning_cache(tmp_path_factory):
    """The costs that `featx extract` measures (featx.tuning) are kept in a folder of the session, for its
    subprocesses too, and never in the user's cache."""
    os.environ["FEATX_CACHE_DIR"] = str(tmp_path_factory.mktemp("featx-cache"))


@pytest.fixture(scope="session", autouse=True)
def interruptible_children():
    """A shell starts a background job with SIGINT ignored, and children inherit that: restore Python's own
    handler, so that the featx processes of the Ctrl-C tests stop on SIGINT wherever pytest runs."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in cuda_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cli():
    """`cli(*args, env=None)`: featx's click group run in this process (cli_support.invoke); returns click's
    Result."""
    return cli_support.invoke


@pytest.fixture(scope="session")
def featx_run():
    """`featx_run(*args, wait=True, env=None, launcher=None, cwd=None, timeout=600, stdout=DEVNULL)`: the `featx`
    command as a process with the test's environment (cli_support.featx); returns the CompletedProcess, text output
    captured, or with wait=False the started Popen."""
    return cli_support.featx


@pytest.fixture
def image_folders(tmp_path):
    """`image_folders(name="data", **kwargs)`: tmp_path/name/<class>/<i>.png made by imagegen.make_image_folder
    (classes, per_class, splits, size, ext, seed)."""
    def make(name: str = "data", **kwargs) -> Path:
        return make_image_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def image_folder(image_folders) -> Path:
    """tmp_path/data: the classes ants and bees, 3 images each."""
    return image_folders("data", per_class=3)


@pytest.fixture
def images(tmp_path):
    """`images(folder="img", n=3, ext="png", cls=None)`: n loose images tmp_path/folder/<i>.<ext>, image i of
    class `cls` (or class i) with seed i."""
    def make(folder: str = "img", n: int = 3, ext: str = "png", cls: int | None = None) -> list[Path]:
        return [make_image(tmp_path / folder / f"{i}.{ext}", i if cls is None else cls, i) for i in range(n)]

    return make
