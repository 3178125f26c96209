"""CLI: `featx finetune` (a thin wrapper over featx.finetune)."""
from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import FeatxError
from ..finetuning.options import FinetuneOptions
from ..options import flag_spelling
from .common import echo_json, on_interrupt, spell_with


@click.command("finetune")
@click.argument("data", required=False)
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Run folder to write (config, metrics, checkpoints, model.pt).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this folder after its last completed epoch, with the data and options it recorded (DATA and options may be left out; --epochs above the recorded number extends the run).")
@FinetuneOptions.click_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune_cmd(data, output, resume_dir, as_json, quiet, **params):
    """Finetune BACKBONE with a new head on DATA into the run folder -o (or continue one with --resume).

    DATA is an ImageFolder (root/<class>/<img>, or root/train/... + root/val/...), a CSV of path,label[,split],
    or 'digits' (with --task segment: image + mask pairs, see --task). Each epoch prints its losses and accuracies and writes checkpoint.pt atomically; model.pt holds the
    best epoch by val accuracy and works as -w for extract, fit-head and finetune.
    """
    from ..sharding import discover
    from ..finetuning import finetune
    from ..finetuning.resume import resume_arguments

    options = FinetuneOptions.from_command_line(params).to_dict()  # a value out of range: a usage error first
    if resume_dir and output and os.path.abspath(resume_dir) != os.path.abspath(output):
        raise FeatxError(f"--resume {resume_dir} and -o {output}: give one run folder")
    if not (resume_dir or output):
        raise FeatxError("featx finetune: give the run folder with -o RUN_DIR (or --resume RUN_DIR)")
    if not (data or resume_dir):
        raise FeatxError("featx finetune: give DATA (an ImageFolder, a CSV of path,label, or 'digits') and -o RUN_DIR")
    spell_with(_spelling(resume_dir or output, bool(resume_dir)))
    log = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    arguments = dict(data=data, output=output, **options)
    if resume_dir:  # the run's record, and on top of it what was given on this command line
        ctx = click.get_current_context()
        given = {name for name in ctx.params if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
        arguments = resume_arguments(resume_dir, {name: value for name, value in arguments.items() if name in given})
    run = arguments["output"]
    on_interrupt(lambda: _interrupted(run))
    result = finetune(**arguments, progress=not quiet and not as_json, log=log)
    if discover().index:  # under torchrun, rank 0 alone reports
        return
    if as_json:
        echo_json({
            "run_dir": str(result.run_dir), "epochs": result.epochs, "best_epoch": result.best_epoch,
            "best_val_acc": result.best_val_acc, "stopped_early": result.stopped_early,
            "trained_epochs": result.trained_epochs, "planned_epochs": result.planned_epochs,
            "seconds": round(result.seconds, 3), "history": result.history,
        })
        return
    click.echo(result.summary())


def _spelling(folder, resuming: bool):
    """How this command names featx.finetune's parameters: `--resume DIR` stands for two of them, output=DIR and
    resume=True (and for the run=DIR of featx.finetuning.resume), every other one by its flag."""
    spell = flag_spelling(finetune_cmd.params)

    def respell(name: str, value) -> str:
        if value is not dataclasses.MISSING and (name in ("run", "resume") or name == "output" and resuming):
            return f"--resume {shlex.quote(str(folder))}"
        return spell(name, value)

    return respell


def _interrupted(run) -> str:
    """What Ctrl-C left: the completed epochs and how to continue them, or nothing (no epoch had completed)."""
    from ..finetuning.checkpoint import CHECKPOINT, METRICS

    if not (Path(run) / CHECKPOINT).is_file():
        return f"featx: interrupted before the first epoch completed: nothing was kept in {run}"
    try:
        done = len((Path(run) / METRICS).read_text().splitlines())
    except OSError:
        done = "its"
    epochs = "epoch" if done == 1 else "epochs"
    return f"featx: interrupted: {run} keeps {done} completed {epochs}; continue with: featx finetune --resume {run}"


COMMANDS = [finetune_cmd]
