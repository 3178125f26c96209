"""The command line's scaling-out mistakes: one line, exit code 2, and the committed segments of an unfinished
run are all still there afterwards."""
from __future__ import annotations

import sys

import pytest

from featx.extraction import extract
from options_support import EXTRACT, cli_args

OPTIONS = dict(EXTRACT, batch_size=2)
FAST = [*cli_args(OPTIONS), "-q"]


@pytest.fixture
def unfinished(tmp_path, image_folders):
    """A folder and a store whose run stopped at a broken file: committed segments, nothing sealed."""
    data = image_folders("data", per_class=4)
    (data / "bees/zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "s.h5"
    with pytest.raises(Exception):
        extract(data, out, on_error="fail", **OPTIONS)
    segments = sorted(out.with_name("s.h5.parts").rglob("seg-*.h5"))
    assert segments
    return data, out, segments


@pytest.mark.parametrize("args, env, expected", [
    (["--decode", "gpu"], {}, "--decode gpu: CUDA is not available on this machine (use --decode exact)"),
    (["--num-shards", "2"], {}, "--num-shards and --shard-index: give both"),
    (["--num-shards", "2", "--shard-index", "5"], {}, "--shard-index 5: expected 0..1 for --num-shards 2"),
    (["--num-shards", "2", "--shard-index", "0", "--overwrite"], {}, "--overwrite: not with several shards"),
    ([], {"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2 is set but MASTER_ADDR/MASTER_PORT are not"),
    (["--num-shards", "2", "--shard-index", "0"], {"WORLD_SIZE": "2", "RANK": "0"}, "--num-shards: not under torchrun"),
    (["--ray-address", "127.0.0.1:1"], {}, "--ray-address: only with --engine ray"),
])
def test_scale_out_mistakes_keep_committed_segments(unfinished, monkeypatch, args, env, expected, cli):
    import torch

    data, out, segments = unfinished
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    res = cli("extract", data, "-o", out, *FAST, *args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"featx: error: {expected}")
    assert sorted(out.with_name("s.h5.parts").rglob("seg-*.h5")) == segments


def test_engine_ray_without_ray_is_one_line(unfinished, monkeypatch, cli):
    data, out, segments = unfinished
    monkeypatch.setitem(sys.modules, "ray", None)
    res = cli("extract", data, "-o", out, *FAST, "--engine", "ray")
    assert res.exit_code == 2 and res.output.strip() == "featx: error: --engine ray: Ray Data is not installed here: pip install 'featx[ray]'"
    assert sorted(out.with_name("s.h5.parts").rglob("seg-*.h5")) == segments
