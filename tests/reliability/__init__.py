"""The reliability suite: crashes, hostile files, concurrency, full disks, untrusted files, memory.

Every module is marked `reliability` and `slow`: `pytest -m "not slow"` skips it, `.ci/run` runs it. This folder is
a package so that its modules import as `reliability.*` and `tests/` (with `imagegen`) is on sys.path.
"""
