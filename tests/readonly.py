"""A folder this process cannot write in, also when the tests run as root (who may write through any mode)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` unwritable for the duration: mode 0o555, or as root the immutable attribute (chattr +i); skip
    the test when neither can be set here."""
    folder = Path(folder)
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and chattr +i cannot make a folder read-only here")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
