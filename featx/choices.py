"""The choice lists (and ranges) of options shared by the CLI and the engine, in a module that imports nothing heavy.

`featx --help` and `featx info` build their option tables from these without loading torch.
"""
from __future__ import annotations

POOLINGS = ("avg", "max", "avgmax", "gem", "flatten", "none")
TOKEN_POOLINGS = ("cls", "mean")
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKBONE_HELP = ("torchvision model name, or timm/<name> for a timm model (pip install featx[timm]); featx layers "
                 "--list. Default: the backbone a -w file from featx finetune records, else resnet50.")
WEIGHTS_MATCH_HELP = ("How a -w FILE's tensors pair with the model's: by key and shape, or by position (a file of "
                      "the same architecture in another implementation's names).")
DTYPES = ("float32", "float16")  # --dtype: how a store keeps its rows
ON_ERROR = ("skip", "fail")  # --on-error: an image that cannot be read is a failed row, or stops the run
ENGINES = ("local", "ray")  # --engine of featx extract
RETENTIONS = ("mirror", "add", "prune")  # what a store keeps of rows whose files are gone (featx.retention)
WEIGHTS_MATCHES = ("name", "order")  # --weights-match: pair a weights file's tensors by key and shape, or by position
EXPORT_FORMATS = ("npy", "parquet")  # featx export: clip-retrieval's npy + parquet layout, or one parquet file
# --decoder of a segmentation head
DECODER_HELP = ("conv:WIDTH (3x3 conv-ReLU, then a 1x1 conv to the classes), linear (a 1x1 conv probe), or fpn:WIDTH "
                "(fuses several --tap maps: 1x1 lateral convs to WIDTH, top-down upsample and add, 3x3 conv-ReLU, "
                "1x1 conv to the classes)")
# --decode: full-size decode, the reference pipelines' pixels ('exact'); JPEGs decoded at a reduced DCT scale that
# keeps both sides >= 2x the resize ('fast') or >= the resize ('reduced', what stores made before 'exact' hold:
# recorded as 'cpu', or not at all); JPEGs decoded on the CUDA device ('gpu')
DECODES = ("exact", "fast", "reduced", "gpu")
TRAIN_DECODES = ("exact", "fast")  # --decode of featx finetune
DEFAULT_DECODE = "exact"
DECODE_HELP = ("exact: every image at full size, the reference pipelines' pixels; fast: large JPEGs decoded at a "
               "reduced scale (>= 2x the resize) first, faster, pixels a little off")
LEGACY_DECODE = "reduced"
MAX_SEED = 2**32 - 1  # --seed: numpy's RandomState and scikit-learn take 32-bit seeds


def recorded_decode(config: dict) -> str:
    """The --decode mode of a store's (or a head's) config; configs from before 'exact' hold 'cpu' or nothing."""
    value = config.get("decode")
    return LEGACY_DECODE if value in (None, "cpu") else str(value)


def check_seed(seed) -> None:
    """OptionError unless `seed` is an integer numpy's RandomState and scikit-learn accept (0 to 2**32 - 1)."""
    from .options import OptionError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise OptionError("{seed=}: expected an integer from 0 to {max}", seed=seed, max=MAX_SEED)
