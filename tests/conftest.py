"""Shared by every test: torch runs on one intra-op thread, measured pipeline costs stay in the session's folder,
and tests marked `cuda` skip without a CUDA device.

Tiny tensors are fastest on one thread, and several times faster on a busy machine, where idle OpenMP threads spin
for a core. The reliability suite keeps torch's default, because it compares in-process runs with real `featx`
subprocesses bit for bit, and the thread count changes the order of float reductions."""
from __future__ import annotations

import pytest


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
    import os

    os.environ["FEATX_CACHE_DIR"] = str(tmp_path_factory.mktemp("featx-cache"))


def pytest_collection_modifyitems(config, items):
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in cuda_tests:
            item.add_marker(skip)
