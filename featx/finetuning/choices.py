"""The option lists and help texts of `featx finetune`, in a module that imports nothing heavy.

The CLI builds its option table from these without loading torch; the engine modules import them from here.
"""
from __future__ import annotations

AUGMENTS = ("default", "flip", "none")
AUGMENT_HELP = "default: random resized crop + horizontal flip; flip: the eval crop + flip; none: the eval crop"
FREEZE_HELP = ("none | backbone | until:LAYER | loaded | a module name or parameter-name pattern such as 'layer1' or "
               "'layer1.*' (repeatable)")
HEAD_HELP = "linear, or mlp:HIDDEN[,DROPOUT] (Linear-ReLU-Dropout-Linear, dropout 0.5 by default)"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "onecycle", "none")
WARMUP_HELP = "epochs (2, 0.5) or steps (300steps)"
TASKS = ("classify", "segment")
DEFAULT_LIMIT_MB = 4096  # --decode-cache-mb: the decoded-image cache's size limit
