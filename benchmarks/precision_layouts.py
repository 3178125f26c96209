"""Why featx runs what it runs on this CPU: resnet18 inference img/s per precision and memory layout, side by side.

Prints img/s of fp32 NCHW (what a plain loop runs), fp32 channels_last, bf16 autocast NCHW and bf16 autocast
channels_last, each as a ratio to fp32 NCHW, plus what `--precision auto` picks here. On CPUs without fast bf16
kernels (AVX2 only) bf16 is emulated and far slower, which is why auto falls back to fp32 there.

    python benchmarks/precision_layouts.py [--batch-size 32] [--images 128]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from featx.runtime import resolve_runtime


def images_per_second(model, batch_size: int, images: int, channels_last: bool, dtype: torch.dtype | None,
                      device: torch.device = torch.device("cpu")) -> float:
    """Inference throughput of `model` on random 224 px batches in one layout, under autocast to `dtype` (None: fp32)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=layout)
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        model(x)
        start, done = time.perf_counter(), 0
        while done < images:
            model(x)
            done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="images timed per variant (bf16 gets a quarter)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    print(f"resnet18, 224 px, batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, featx --precision auto -> "
          f"{resolve_runtime('cpu', 'auto').describe()}")
    base = None
    for name, channels_last, bf16 in [("fp32 NCHW", False, False), ("fp32 channels_last", True, False),
                                      ("bf16 NCHW", False, True), ("bf16 channels_last", True, True)]:
        count = args.images // 4 if bf16 else args.images
        rate = images_per_second(model, args.batch_size, max(count, args.batch_size), channels_last,
                                 torch.bfloat16 if bf16 else None)
        base = base or rate
        print(f"{name:20s} {rate:7.1f} img/s   x{rate / base:.2f} vs fp32 NCHW", flush=True)


if __name__ == "__main__":
    main()
