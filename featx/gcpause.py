"""Building the per-row lists of a large store (a million paths, keys, stat rows, row locations) without Python's
cyclic garbage collector walking every live object again and again.

Each full collection visits every object alive, the modules of torch included (0.15 s with torch loaded), and
building a list of a million tuples triggers several. The objects these builders make (tuples, strings, numbers,
arrays) hold no reference cycles, so pausing the collector while they run leaves nothing uncollected: `without_gc`
does that for one call, and the collector runs again as before once it returns.
"""
from __future__ import annotations

import functools
import gc


def without_gc(function):
    """`function`, run with the cyclic garbage collector paused (nested calls leave it to the outermost)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        if not gc.isenabled():
            return function(*args, **kwargs)
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            gc.enable()

    return run
