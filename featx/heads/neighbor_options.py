"""The options of `featx neighbors`, `featx.heads.neighbors.neighbors` and `.duplicates`, spelled once
(featx.options). A field's metadata says which function takes it: `fits="duplicates"`, `fits="both"`, or nothing
(neighbors alone)."""
from __future__ import annotations

from dataclasses import dataclass

from ..choices import DEVICE_CHOICES
from ..options import Options, option

MAX_PAIRS = 100_000
BOTH = {"fits": "both"}
DUPLICATES = {"fits": "duplicates"}


@dataclass(frozen=True)
class NeighborsOptions(Options):
    """Everything a neighbors or duplicates call takes besides the store, the queries and the call's plumbing."""

    k: int = option(10, "-k", low=1, help="Neighbours per query (clamped to the rows the store holds, with a note).")
    tap: str | None = option(None, "-l", "--layer", "--tap", kind=str, metadata=BOTH,
                             help="Tap to search (default: the store's only tap).")
    threshold: float = option(0.98, "--threshold", low=-1, high=1, expected="a cosine similarity from -1 to 1",
                              metadata=DUPLICATES, help="--duplicates: the least cosine similarity of a pair.")
    max_pairs: int = option(MAX_PAIRS, "--max-pairs", low=1, metadata=DUPLICATES,
                            help="--duplicates: refuse (one line) when more pairs than this are found.")
    query_store: str | None = option(
        None, "--query-store", kind=str,
        help="Store for the query images' features (default: STORE's name with .queries.h5, beside it).")
    weights: str | None = option(
        None, "-w", "--weights", kind=str, metavar="FILE",
        help="STORE's weights file, when it is no longer where STORE recorded it (its sha256 must be the recorded "
             "one).")
    chunk_rows: int | None = option(None, kind=int, low=1, metadata=BOTH)  # gallery rows read at a time
    batch_size: int = option(64, "--batch-size", low=1)
    device: str = option("auto", "--device", help=DEVICE_CHOICES)
    workers: int | None = option(None, "--workers", kind=int, low=0,
                                 help="Image decoding workers (default: cores - 1).")

    def keywords(self, function: str) -> dict:
        """The keywords of `function` ('neighbors' or 'duplicates') among the options."""
        names = set(self.names(fits="both")) | set(self.names(fits=None if function == "neighbors" else function))
        return {name: value for name, value in self.to_dict().items() if name in names}
