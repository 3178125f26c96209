"""The fast option sets the tests share (random-init backbones on small images, no loader workers) and `cli_args`,
which spells a set as command-line words."""
from __future__ import annotations

import dataclasses

from featx.extract_options import ExtractOptions
from featx.options import SPEC

EXTRACT = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0)
HEAD_EXTRACT = dict(backbone="resnet18", weights="none", taps=["avgpool"], image_size=32, workers=0, precision="fp32")
FINETUNE = dict(backbone="mobilenet_v3_small", weights="none", image_size=16, batch_size=3, workers=0,
                precision="fp32", device="cpu")


def cli_args(options: dict, command=ExtractOptions) -> list[str]:
    """`options` as the words of `command` (an Options class): each option's long flag and its value, a list's flag
    once per item."""
    flags = {f.name: next(flag for flag in f.metadata[SPEC].flags if flag.startswith("--"))
             for f in dataclasses.fields(command) if f.metadata[SPEC].flags}
    words = []
    for name, value in options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [flags[name], str(item)]
    return words


EXTRACT_ARGS = cli_args(EXTRACT)
