"""Shared by every test: torch runs on one intra-op thread.

Tiny tensors are fastest on one thread, and several times faster on a busy machine, where idle OpenMP threads spin
for a core. Subprocess tests (real `featx` runs) keep the default thread count."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
