"""The options of `featx layers` and `featx.layers` (with its table's, featx.layer_table.format_layers_table), spelled
once (featx.options). A field's metadata `fits="table"` marks the table's options."""
from __future__ import annotations

from dataclasses import dataclass

from .choices import DTYPES, POOLINGS, WEIGHTS_MATCH_HELP, WEIGHTS_MATCHES
from .options import Options, option

TABLE = {"fits": "table"}


@dataclass(frozen=True)
class LayersOptions(Options):
    """Everything a layers call takes besides the backbone and the log, and the table's options."""

    weights: str = option(
        "none", "-w", "--weights",
        help="Weights to load first (a file shows its load report); the shapes do not depend on them.")
    weights_match: str = option("name", "--weights-match", choices=WEIGHTS_MATCHES, help=WEIGHTS_MATCH_HELP)
    include_all: bool = option(False, "--all", help="Every graph node, not only the usual taps.")
    image_size: int = option(224, "--image-size", low=8)
    pooling: str = option("avg", "--pooling", choices=POOLINGS)
    n_images: int | None = option(None, "-n", "--images", kind=int, low=1, metadata=TABLE,
                                  help="Estimate the store size for this many images.")
    dtype: str = option("float32", "--dtype", choices=DTYPES, metadata=TABLE)

    def keywords(self, table: bool = False) -> dict:
        """The keywords of featx.layers, or with `table` of format_layers_table."""
        names = set(self.names(fits="table" if table else None))
        return {name: value for name, value in self.to_dict().items() if name in names}
