"""The `featx` command line: a thin layer over the Python API. Each command group lives in its own module."""
from __future__ import annotations

import click

from .. import __version__
from .common import FeatxGroup


@click.group(cls=FeatxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="featx")
def main() -> None:
    """featx: cache frozen-backbone embeddings in HDF5, train scikit-learn heads on them, or finetune.

    \b
    featx layers resnet50                        which depths can be tapped
    featx extract data/ -b resnet50 -l avgpool -o pets.h5
    featx info pets.h5
    featx fit-head pets.h5 -l avgpool -o pets-head/
    featx predict pets-head/ new_images/
    featx finetune data/ -b resnet50 --freeze until:layer2 -o runs/pets/
    featx advise data/ -b resnet50               probe or finetune? measured, with the command
    featx serve pets-head/ --port 8000
    featx export pets.h5 -o pets-emb/           npy + parquet for numpy, pandas, faiss
    """


def _register() -> None:
    from . import advise_cmd, export_cmd, extract_cmds, finetune_cmd, head_cmds, serve_cmd

    for module in (extract_cmds, export_cmd, head_cmds, finetune_cmd, advise_cmd, serve_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
