"""`finetune`: a backbone (torchvision or timm) with a new head, trained on an image source into a run folder."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones import load_backbone
from ..choices import DEFAULT_DECODE
from ..memory import check_batch_memory, out_of_memory_as_error
from ..options import OptionError
from ..runtime import resolve_runtime
from . import ddp
from .checkpoint import CHECKPOINT, RunDir
from .classify import ClassifyTask
from .choices import DEFAULT_LIMIT_MB
from .decoded import DecodedCache
from .options import FinetuneOptions
from .task import Task, build_trainer
from .train import Trainer

# Config fields recorded for provenance; every other field must be the same when a run is resumed.
PROVENANCE = ("device", "workers", "ranks", "source", "weights_path", "featx_version", "torch", "torchvision")
# Config fields that runs recorded before they existed resume with, and the value they take there.
ADDED_FIELDS = {"decode": DEFAULT_DECODE}


@dataclass
class FinetuneResult:
    """What a `finetune` call did: the run folder, the best and the last epoch's metrics, the time it took."""

    run_dir: Path
    epochs: int  # epochs completed
    best_epoch: int
    best_val_acc: float | None  # None without validation
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    stopped_early: bool
    trained_epochs: int  # epochs this call trained (0: the run was complete already)
    planned_epochs: int  # the run's epochs
    history: list[dict] = field(repr=False)

    def summary(self) -> str:
        best = f"best val acc {self.best_val_acc:.4f} at epoch {self.best_epoch}" if self.best_val_acc is not None \
            else "no validation"
        row = next((r for r in self.history if r["epoch"] == self.best_epoch), {})
        best += "".join(f", val {key[4:]} {value:.4f}" for key, value in row.items()
                        if key.startswith("val_") and key not in ("val_loss", "val_acc") and isinstance(value, float))
        early = " (stopped early)" if self.stopped_early else ""
        if not self.trained_epochs:
            further = "start a new run to train further" if self.stopped_early else \
                f"give more than {self.planned_epochs} epochs to train it further"
            return (f"{self.run_dir}: complete already, nothing to train ({self.epochs} of {self.planned_epochs} "
                    f"epochs{early}, {best}: {self.run_dir}/model.pt); {further}")
        epochs = "1 epoch" if self.epochs == 1 else f"{self.epochs} epochs"
        return f"{epochs}{early} in {self.seconds:.1f} s, {best}: {self.run_dir}/model.pt"


def finetune(
    data,
    output,
    *,
    backbone: str | None = None,
    weights: str = "DEFAULT",
    weights_match: str = "name",
    head: str = "linear",
    freeze="none",
    unfreeze_at: int | None = None,
    train_bn: bool = False,
    init_head=None,
    optimizer: str = "sgd",
    lr: float | None = None,
    backbone_lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    schedule: str = "cosine",
    warmup="0",
    label_smoothing: float = 0.0,
    epochs: int = 10,
    batch_size: int = 32,
    augment: str = "default",
    decode: str = DEFAULT_DECODE,
    image_size: int | None = None,
    val_split: float | None = None,
    early_stop: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    decode_cache: str | None = "auto",
    decode_cache_mb: float = DEFAULT_LIMIT_MB,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    log=None,
    task: str = "classify",
    tap: str | list[str] | None = None,
    decoder: str = "conv:256",
    binary: bool = False,
    num_classes: int | None = None,
    dice_weight: float = 0.0,
) -> FinetuneResult:
    """Finetune `backbone` with a new head on `data` (ImageFolder / CSV / 'digits') into the run folder `output`
    (`backbone` None: the one a weights file written by `featx finetune` records, else resnet50).

    head: 'linear' or 'mlp:HIDDEN[,DROPOUT]'. freeze: a strategy or a list of them ('none', 'backbone',
    'until:LAYER', 'loaded', parameter-name patterns); unfreeze_at: the epoch from which everything trains.
    weights_match: pair a weights file's tensors with the model's by key and shape ('name') or by position
    ('order'). init_head: a head folder written by `featx fit-head` whose linear head starts the new head.
    Validation is the data's val split, else a stratified `val_split` hold-out (0.2 by default, 0 for none). lr defaults to 0.01 (sgd)
    or 1e-3 (adam, adamw); backbone_lr to lr. warmup: epochs ('2') or steps ('300steps').
    decode: how images are decoded, 'exact' (full size, the reference pipelines' pixels) or 'fast' (large JPEGs
    at a reduced scale first, as `featx extract --decode fast`; classification only); recorded by the run.
    decode_cache: where each image's decoded pixels are kept so that later epochs do not decode it again ('auto':
    OUTPUT/decoded/, removed when the call ends, completed or not; a folder: kept and shared by runs; None or 'none': off), within
    `decode_cache_mb` (see featx.finetuning.decoded). `resume` continues the run in `output` after its last completed
    epoch (with the same settings; more `epochs` than recorded extend it, see featx.finetuning.resume for the call
    that fills in the recorded settings); `overwrite` starts a new run where one exists. `log` receives the report lines. Returns a FinetuneResult.

    task 'segment': `data` is image + mask pairs (featx.segment.source), the backbone is cut at `tap` (layer4 for
    ResNets) with a `decoder` ('conv:256' or 'linear'), or at several taps fused by 'fpn:WIDTH' (`tap` a list;
    default: the stage maps of stride 4, 8, 16 and 32); `binary` masks train one logit with BCE, `num_classes` bounds
    the mask ids, `dice_weight` adds a soft Dice term; the best epoch is the one of highest val mean IoU.
    """
    options = FinetuneOptions.of(locals())  # first statement: an OptionError for a value an option does not take
    started = time.perf_counter()
    log = log or (lambda line: None)
    opts = options.train_options()
    job = _task(options)
    session = ddp.join(device)  # under torchrun: this rank's place, its device, the process group
    try:
        session.check_batch(opts.batch_size)
        if not session.is_main:
            log, progress = (lambda line: None), False
        runtime = resolve_runtime(session.device, precision)
        bb = load_backbone(backbone, weights, match=weights_match)  # before the run folder: bad weights touch nothing
        check_batch_memory(bb.model, bb.transform.with_sizes(opts.image_size).crop, opts.batch_size // session.world,
                           runtime.device, training=True)
        run = RunDir(output)
        checkpoint = session.prepare_run(run, resume, overwrite)
        trainer = cache = None
        try:
            with out_of_memory_as_error("batch_size", opts.batch_size, runtime.device):
                setup_lines: list[str] = []  # shown once the run is known to start: a bad input gives one line only
                cache_lines: list[str] = []  # shown after the data and model lines
                cache = _decoded_cache(decode_cache, decode_cache_mb, run, job, cache_lines.append)
                trainer = build_trainer(job, data, bb, weights, init_head, opts, runtime, workers, run, progress,
                                        setup_lines.append, cache)
                setup_lines += cache_lines
                trainer.config["ranks"] = session.world
                session.check_same(trainer.config, PROVENANCE)
                if checkpoint is not None:
                    _check_resumable(checkpoint, trainer.config, run.path)
                session.attach(trainer)
                if checkpoint is not None:
                    trainer.load_state_dict(checkpoint)
                elif session.is_main and not (run / CHECKPOINT).exists():
                    run.write_config(trainer.config)
                done = len(trainer.history)
                if not trainer.complete:
                    for line in setup_lines + _resume_lines(checkpoint, opts.epochs, run.path, len(trainer.train_loader)):
                        log(line)
                    trainer.log = log
                    trainer.fit()
        finally:
            if trainer is not None:
                trainer.close()
            if cache is not None and session.is_main:
                cache.close()  # the run-owned RUN/decoded/ goes, whether training completed or not
            run.release()
    finally:
        session.close()
    return _result(trainer, run.path, time.perf_counter() - started, len(trainer.history) - done)


def _resume_lines(checkpoint: dict | None, epochs: int, path: Path, steps_per_epoch: int) -> list[str]:
    """What a resumed run says before it trains: where it continues, and how an extended run is scheduled."""
    if checkpoint is None:
        return []
    recorded = checkpoint["config"]["epochs"]
    if epochs == recorded:
        return [f"resuming {path} after epoch {checkpoint['epoch']}/{epochs}"]
    return [f"extending {path} from {recorded} to {epochs} epochs, after epoch {checkpoint['epoch']}: from step "
            f"{checkpoint['epoch'] * steps_per_epoch + 1} on, the learning rate follows the schedule of a "
            f"{epochs}-epoch run"]


def _task(options: FinetuneOptions):
    """The Task object for `options.task`; an OptionError for options of the other task."""
    segment = {name: getattr(options, name) for name in FinetuneOptions.names(fits="segment")}
    if options.task == "classify":
        defaults = FinetuneOptions.defaults()
        given = [name for name, value in segment.items()
                 if ((value or None) if name == "tap" else value) != defaults[name]]
        if given:
            raise OptionError(", ".join("{%s}" % name for name in given) + ": segmentation options, they need {task=}",
                              task="segment")
        return ClassifyTask(options.init_head)
    if options.init_head is not None or options.head != "linear":
        raise OptionError("{task=}: {init_head} and {head} are for classification; use {decoder}", task=options.task)
    if options.decode != DEFAULT_DECODE:
        raise OptionError("{decode=} is for classification: {task=} decodes images at full size, as their masks are",
                          decode=options.decode, task=options.task)
    from .segment import SegmentTask

    return SegmentTask(**segment)


def _decoded_cache(where, limit_mb: float, run: RunDir, task: Task, log) -> DecodedCache | None:
    """The run's decoded-image cache (tasks whose loaders use one), or None when off or not writable (one log line)."""
    if where is None or str(where) == "none" or not task.uses_decoded_cache or not limit_mb:
        return None
    if str(where) == "auto":
        return DecodedCache.open(run / "decoded", limit_mb, log, remove_when_done=True)
    return DecodedCache.open(where, limit_mb, log)


# The parameter that sets each config field, where it is not the field's own name.
PARAMETER_OF = {"source": "data", "classes": "data", "n_train": "data", "n_val": "data", "weights_sha256": "weights",
                "classifier": "backbone", "transform": "image_size"}


def _check_resumable(checkpoint: dict, new: dict, path: Path) -> None:
    """OptionError when this call cannot continue the checkpoint's run: a setting differs (naming the parameters), or
    fewer epochs than recorded are asked for. More epochs extend the run; PROVENANCE fields may differ."""
    old = {**ADDED_FIELDS, **checkpoint["config"]}
    differ = [key for key in {**old, **new} if key not in PROVENANCE and key != "epochs"
              and old.get(key) != new.get(key) and not _same_weights_file(key, old, new)]
    if differ:
        shown = "; ".join("{%s} {old%d} there, {new%d} now" % (PARAMETER_OF.get(key, key), i, i)
                          for i, key in enumerate(differ[:4]))
        raise OptionError("{output=$folder}: the run was recorded with other settings (%s): leave those out to continue it "
                          "as recorded ({config}), or start a new run (another {output}, or {overwrite=True})" % shown,
                          folder=str(path), config=path / "config.json",
                          **{f"old{i}": _short(old.get(key)) for i, key in enumerate(differ[:4])},
                          **{f"new{i}": _short(new.get(key)) for i, key in enumerate(differ[:4])})
    if new["epochs"] < old["epochs"]:
        raise OptionError("{epochs=%d}: the run in {path} was recorded with {old} epochs ({done} done): give {old} (or "
                          "leave {epochs} out) to continue it, or more to extend it" % new["epochs"], path=path,
                          old=old["epochs"], done=checkpoint["epoch"])


def _same_weights_file(key: str, old: dict, new: dict) -> bool:
    """A weights file that was moved or renamed is the same weights when its sha256 is."""
    return key == "weights" and str(old.get(key)).startswith("file:") and str(new.get(key)).startswith("file:") \
        and old.get("weights_sha256") == new.get("weights_sha256")


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _result(trainer: Trainer, run_dir: Path, seconds: float, trained: int) -> FinetuneResult:
    best, last = trainer.best, trainer.history[-1]
    return FinetuneResult(
        run_dir=run_dir, epochs=len(trainer.history), best_epoch=best["epoch"], best_val_acc=best["val_acc"],
        train_loss=last["train_loss"], train_acc=last["train_acc"], val_loss=last["val_loss"],
        val_acc=last["val_acc"], seconds=seconds, stopped_early=trainer.stopped_early, trained_epochs=trained,
        planned_epochs=trainer.epochs, history=trainer.history,
    )
