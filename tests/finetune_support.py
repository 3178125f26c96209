"""What the finetune tests share: a digest of a run folder's files."""
from __future__ import annotations

import hashlib


def digest(folder) -> dict[str, str]:
    """sha256 of every file in a run folder, the lock file aside."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".featx")}
