"""CLI: `featx finetune` (a thin wrapper over featx.finetune)."""
from __future__ import annotations

import os
from pathlib import Path

import click
from click.core import ParameterSource

from ..choices import DECODER_HELP, DEVICE_CHOICES, PRECISIONS, WEIGHTS_MATCHES
from ..errors import FeatxError
from ..finetuning.choices import (
    AUGMENT_HELP, AUGMENTS, FREEZE_HELP, HEAD_HELP, OPTIMIZERS, SCHEDULES, TASKS, WARMUP_HELP,
)
from .common import BACKBONE_HELP, echo_json, on_interrupt


@click.command("finetune")
@click.argument("data", required=False)
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Run folder to write (config, metrics, checkpoints, model.pt).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this folder after its last completed epoch, with the data and options it recorded (DATA and options may be left out; --epochs above the recorded number extends the run).")
@click.option("--overwrite", is_flag=True, help="Start a new run in a folder that holds one (its files are replaced when the first epoch completes).")
@click.option("-b", "--backbone", help=BACKBONE_HELP)
@click.option("-w", "--weights", default="DEFAULT", show_default=True,
              help="torchvision weights name or timm tag, a local .pth/.safetensors (partial loading, with a report), a finetuned RUN/model.pt, or 'none'.")
@click.option("--weights-match", type=click.Choice(WEIGHTS_MATCHES), default="name", show_default=True,
              help="How a -w FILE's tensors pair with the model's: by key and shape, or by position (a file of the same architecture in another implementation's names).")
@click.option("--head", default="linear", show_default=True, help=f"New head: {HEAD_HELP}.")
@click.option("--freeze", multiple=True, help=f"What stays fixed: {FREEZE_HELP}. Default: none.")
@click.option("--unfreeze-at", type=click.IntRange(min=2), help="Epoch from which every parameter trains.")
@click.option("--train-bn", is_flag=True, help="BatchNorm layers always normalise with the batch and update their running statistics: frozen layers too, and at batches under 16 images (where they keep them fixed by default).")
@click.option("--init-head", type=click.Path(exists=True, file_okay=False), help="Start the head from a linear head folder of `featx fit-head` (probe, then finetune).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="sgd", show_default=True)
@click.option("--lr", type=float, help="Learning rate of the head (default: 0.01 sgd, 1e-3 adam/adamw).")
@click.option("--backbone-lr", type=float, help="Learning rate of the backbone (default: --lr).")
@click.option("--momentum", type=float, help="SGD momentum or Adam beta1 (default 0.9).")
@click.option("--weight-decay", type=float, help="Default: 1e-4 sgd, 0 adam, 1e-2 adamw.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True, help="Per-step learning-rate schedule.")
@click.option("--warmup", default="0", show_default=True, help=f"Linear warmup: {WARMUP_HELP}.")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--augment", type=click.Choice(AUGMENTS), default="default", show_default=True, help=AUGMENT_HELP + ".")
@click.option("--image-size", type=click.IntRange(min=8), help="Training crop and eval center crop (default: the weights' preset).")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), help="Held-out fraction when DATA has no val split (default 0.2; 0: no validation).")
@click.option("--early-stop", type=click.IntRange(min=1), metavar="PATIENCE", help="Stop after this many epochs without a val accuracy gain.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto = bf16 on CPUs that support it, bf16/fp16 on CUDA.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_CHOICES)
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader decode workers (default: cores - 1).")
@click.option("--decode-cache", default="auto", show_default=True, metavar="auto|DIR|none", help="Where each training image's decoded pixels are kept so later epochs skip decoding (auto: RUN/decoded/, removed when the call ends; a folder is kept and shared by runs).")
@click.option("--decode-cache-mb", type=click.FloatRange(min=0), default=4096, show_default=True, help="Size limit of the decoded-image cache; images beyond it are decoded every epoch.")
@click.option("--task", type=click.Choice(TASKS), default="classify", show_default=True, help="segment: DATA holds image + mask pairs ({train,val}/{images,masks}/<name>, or a CSV image,mask[,split]).")
@click.option("--tap", multiple=True, help="segment: where the backbone is cut (default: layer4 for ResNets, else the last stage map); give it once per map for --decoder fpn (default: the stage maps of stride 4, 8, 16 and 32).")
@click.option("--decoder", default="conv:256", show_default=True, help=f"segment: {DECODER_HELP}.")
@click.option("--binary", is_flag=True, help="segment: every non-zero mask pixel is foreground (one logit, BCE).")
@click.option("--num-classes", type=click.IntRange(min=1), help="segment: mask ids are 0 (background) to this (default: the largest id found).")
@click.option("--dice-weight", type=click.FloatRange(min=0), default=0.0, show_default=True, help="segment: weight of a soft Dice term added to the loss.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def finetune_cmd(data, output, resume_dir, overwrite, backbone, weights, weights_match, head, freeze, unfreeze_at, train_bn, init_head,
                 optimizer, lr, backbone_lr, momentum, weight_decay, schedule, warmup, label_smoothing, epochs,
                 batch_size, augment, image_size, val_split, early_stop, seed, precision, device, workers, decode_cache,
                 decode_cache_mb, task, tap,
                 decoder, binary, num_classes, dice_weight, as_json, quiet):
    """Finetune BACKBONE with a new head on DATA into the run folder -o (or continue one with --resume).

    DATA is an ImageFolder (root/<class>/<img>, or root/train/... + root/val/...), a CSV of path,label[,split],
    or 'digits' (with --task segment: image + mask pairs, see --task). Each epoch prints its losses and accuracies and writes checkpoint.pt atomically; model.pt holds the
    best epoch by val accuracy and works as -w for extract, fit-head and finetune.
    """
    from ..sharding import discover
    from ..finetuning import finetune
    from ..finetuning.resume import resume_arguments

    if resume_dir and output and os.path.abspath(resume_dir) != os.path.abspath(output):
        raise FeatxError(f"--resume {resume_dir} and -o {output}: give one run folder")
    if not (resume_dir or output):
        raise FeatxError("featx finetune: give the run folder with -o RUN_DIR (or --resume RUN_DIR)")
    if not (data or resume_dir):
        raise FeatxError("featx finetune: give DATA (an ImageFolder, a CSV of path,label, or 'digits') and -o RUN_DIR")
    log = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    arguments = dict(
        data=data, output=output, backbone=backbone, weights=weights, weights_match=weights_match, head=head,
        freeze=list(freeze) or "none", unfreeze_at=unfreeze_at, train_bn=train_bn, init_head=init_head,
        optimizer=optimizer, lr=lr, backbone_lr=backbone_lr, momentum=momentum, weight_decay=weight_decay,
        schedule=schedule, warmup=warmup, label_smoothing=label_smoothing, epochs=epochs, batch_size=batch_size,
        augment=augment, image_size=image_size, val_split=val_split, early_stop=early_stop, seed=seed,
        precision=precision, device=device, workers=workers, decode_cache=decode_cache,
        decode_cache_mb=decode_cache_mb, overwrite=overwrite, task=task, tap=list(tap) or None, decoder=decoder, binary=binary,
        num_classes=num_classes, dice_weight=dice_weight,
    )
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
