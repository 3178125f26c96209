"""The choice lists of options shared by the CLI and the engine, in a module that imports nothing heavy.

`featx --help` and `featx info` build their option tables from these without loading torch.
"""
from __future__ import annotations

POOLINGS = ("avg", "max", "avgmax", "gem", "flatten", "none")
TOKEN_POOLINGS = ("cls", "mean")
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
WEIGHTS_MATCHES = ("name", "order")  # --weights-match: pair a weights file's tensors by key and shape, or by position
