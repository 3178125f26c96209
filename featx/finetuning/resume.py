"""What `featx finetune --resume RUN` runs with: the options, data, backbone and weights that RUN/config.json
records, and on top of them the options the caller gave.

Options given with --resume are of three kinds:
    --workers, --device, --decode-cache, --decode-cache-mb   they do not change the numbers: any value
    --epochs   the recorded number continues the run, a larger one extends it (finetune() refuses fewer)
    the rest   must equal the recorded values: finetune() compares the whole config and names what differs
`-w FILE` replaces a recorded weights file that was moved; finetune() checks it against the recorded sha256.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import FeatxError
from ..options import OptionError
from .checkpoint import CONFIG

SEGMENT_FIELDS = ("tap", "decoder", "binary", "num_classes", "dice_weight")


def recorded_config(run) -> dict:
    """RUN/config.json; FeatxError when the folder holds no run."""
    path = Path(run) / CONFIG
    if not Path(run).is_dir():
        raise OptionError("{run=}: no such run folder to resume", run=str(run))
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError("{run=}: no run recorded there to resume (no {config}); start a new run in it first",
                          run=str(run), config=CONFIG) from None
    except (OSError, ValueError) as err:
        raise FeatxError(f"{path}: unreadable run record ({err})") from err


def resume_arguments(run, given: dict) -> dict:
    """The keyword arguments of featx.finetune that continue the run in `run`: what its config.json records, with
    `given` (options the caller set explicitly, by finetune's argument names) on top."""
    from .options import TrainOptions

    config = recorded_config(run)
    recorded = {name: config[name] for name in [f.name for f in dataclasses.fields(TrainOptions)] if name in config}
    recorded.update(data=config["data"], backbone=config["backbone"], weights_match=config.get("weights_match", "name"),
                    init_head=config.get("init_head"), precision=config.get("precision", "auto"),
                    weights=config.get("weights_path") or config["weights"])
    if config.get("task") == "segment":
        recorded.update(task="segment", **{name: config[name] for name in SEGMENT_FIELDS if name in config})
    weights_file = config.get("weights_path")
    if weights_file and "weights" not in given and not Path(weights_file).is_file():
        raise OptionError("{run=}: the run's weights file {file} is gone; pass {weights=FILE} with the same file (its "
                          "sha256 must be {sha}...)", run=str(run), file=weights_file,
                          sha=str(config.get("weights_sha256"))[:16])
    return {**recorded, **given, "output": str(run), "resume": True}
