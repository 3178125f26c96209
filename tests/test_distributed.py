"""featx.sharding: shard discovery from torchrun's environment or --num-shards, assignment by content key, and
the start/finish hand-off through marker files."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from featx import sharding
from featx.sharding import Shard, discover
from featx.errors import FeatxError

JOB = {"config": "c" * 64, "data": "d" * 64}


def test_discover_single_torchrun_and_shards():
    assert discover(environ={}) == Shard()
    assert discover(environ={"WORLD_SIZE": "1", "RANK": "0"}) == Shard()
    assert discover(environ={"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Shard(3, 4, 1, "torchrun")
    assert discover(3, 2, environ={}) == Shard(2, 3, 0, "shards")
    assert discover(1, 0, environ={}) == Shard()
    assert discover(2, 1, environ={}).name == "shard 1/2"
    assert discover(environ={"WORLD_SIZE": "2", "RANK": "0"}).name == "rank 0/2"


@pytest.mark.parametrize("args, environ, match", [
    ((2, None), {}, "give both"),
    ((None, 0), {}, "give both"),
    ((0, 0), {}, "num_shards=0: expected 1 or more"),
    ((2, 2), {}, r"shard_index=2: expected 0\.\.1 for num_shards=2"),
    ((2, -1), {}, "shard_index=-1"),
    ((2, 0), {"WORLD_SIZE": "2", "RANK": "0"}, "not under torchrun"),
    ((None, None), {"WORLD_SIZE": "2"}, "RANK=None: expected an integer"),
    ((None, None), {"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ((None, None), {"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2: expected 0\.\.1"),
])
def test_discover_mistakes_are_one_line_errors(args, environ, match):
    with pytest.raises(FeatxError, match=match) as err:
        discover(*args, environ=environ)
    assert "\n" not in str(err.value)


def test_every_key_has_one_owner_and_shards_are_balanced():
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    shards = [Shard(i, 4, 0, "shards") for i in range(4)]
    owners = [[s.owns(k) for s in shards] for k in keys]
    assert all(sum(row) == 1 for row in owners)
    sizes = [sum(row[i] for row in owners) for i in range(4)]
    assert min(sizes) > 900 and max(sizes) < 1100  # 1000 each, binomial spread ~27
    assert [Shard(0, 4).owner(k) for k in keys] == [Shard(3, 4).owner(k) for k in keys]  # every shard agrees


def test_device_is_the_local_gpu_under_torchrun(monkeypatch):
    import torch

    rank = Shard(1, 2, 1, "torchrun")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank.device("auto") == "cuda:1" and rank.device("cuda") == "cuda:1"
    assert rank.device("cpu") == "cpu" and rank.device("cuda:0") == "cuda:0"
    assert Shard(1, 2, 0, "shards").device("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank.device("auto") == "auto"


def test_last_shard_to_finish_gets_every_report(tmp_path):
    first, last = Shard(1, 2, 0, "shards"), Shard(0, 2, 0, "shards")
    assert sharding.finish(first, tmp_path, JOB, {"failed": {"k1": "bad"}}) == ([{"failed": {"k1": "bad"}}], [0])
    reports, waiting = sharding.finish(last, tmp_path, JOB, {"failed": {}})
    assert waiting == [] and reports == [{"failed": {}}, {"failed": {"k1": "bad"}}]
    other_data = {**JOB, "data": "e" * 64}  # markers of a run on other data are not this job's
    assert sharding.finish(last, tmp_path, other_data, {"failed": {}})[1] == [1]
    assert not list(tmp_path.glob("*.tmp"))


def test_independent_shard_refuses_markers_of_another_config(tmp_path):
    sharding.finish(Shard(0, 2, 0, "shards"), tmp_path, JOB, {"failed": {}})
    sharding.start(Shard(1, 2, 0, "shards"), tmp_path, JOB)
    sharding.start(Shard(1, 3, 0, "shards"), tmp_path, {**JOB, "config": "x"})  # another split: not compared
    with pytest.raises(FeatxError, match="another config") as err:
        sharding.start(Shard(1, 2, 0, "shards"), tmp_path, {**JOB, "config": "x"})
    assert "done-0-of-2.json" in str(err.value)


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_rendezvous_timeout_must_be_positive(value):
    with pytest.raises(FeatxError, match="FEATX_RENDEZVOUS_TIMEOUT"):
        sharding.rendezvous_timeout({"FEATX_RENDEZVOUS_TIMEOUT": value})


RANK = """
import json, sys
from pathlib import Path
from featx import sharding
from featx.errors import FeatxError
folder, job = Path(sys.argv[1]), json.loads(sys.argv[2])
try:
    sharding.start(sharding.discover(), folder, job)
    print("ok")
except FeatxError as err:
    print("error:", err)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(folders, jobs, world=None, timeout="60"):
    """Run sharding.start in one process per rank (as torchrun would start them); their output lines."""
    port = str(_free_port())
    procs = []
    for rank, (folder, job) in enumerate(zip(folders, jobs)):
        env = {**os.environ, "WORLD_SIZE": str(world or len(folders)), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "FEATX_RENDEZVOUS_TIMEOUT": timeout}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(RANK), str(folder), json.dumps(job)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [p.communicate(timeout=120)[0].strip() for p in procs]


@pytest.mark.slow
def test_torchrun_ranks_agree_or_fail_together(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    assert _ranks([shared, shared], [JOB, JOB]) == ["ok", "ok"]
    assert not list(shared.iterdir())  # the start leaves no files behind
    out = _ranks([shared, shared], [JOB, {**JOB, "config": "x"}])
    assert all(line.startswith("error: rank 1 disagrees with rank 0") and "config differ" in line for line in out)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    out = _ranks([tmp_path / "a", tmp_path / "b"], [JOB, JOB])
    assert all("not shared between the ranks" in line and "cannot see the files of ranks" in line for line in out)


@pytest.mark.slow
def test_missing_rendezvous_is_one_line(tmp_path):
    (line,) = _ranks([tmp_path], [JOB], world=2, timeout="3")  # rank 1 never comes
    assert line.startswith("error: rank 0/2: no rendezvous with the other ranks at 127.0.0.1:") and "3 s" in line


def test_world_size_without_torchrun_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(FeatxError, match="WORLD_SIZE=2 is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun"):
        sharding.start(Shard(0, 2, 0, "torchrun"), tmp_path, JOB)
