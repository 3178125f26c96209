"""Training throughput on real JPEGs: `featx finetune` vs the loop the PyTorch transfer-learning tutorial writes.

Both train resnet18 (-w none, new 2-class head, SGD with momentum, batch 32, 224 px random resized crop + flip) on
the same images for the same number of epochs; the last epoch's training images per second are compared:
  featx      featx.finetune: each image decoded once into the run's decoded-image cache (later epochs crop and flip
             cached uint8 pixels), DataLoader workers, bf16 autocast + channels_last where the CPU supports it,
             normalization on the device
  tutorial   torchvision ImageFolder + RandomResizedCrop / RandomHorizontalFlip / ToTensor / Normalize on PIL images,
             fp32, no channels_last, no workers, model.train(), loss.backward(), optimizer.step()
Also printed: the model's pure training step at featx's precision on pre-made tensors (no data at all), the most
featx can reach, and its ratio to the tutorial's loop. Both run on --device (cpu by default). Target on a 2-core CPU: featx / tutorial >= 2.5.
--decode compares finetune's decode modes instead (no tutorial loop): the last epoch's img/s of each, and the ratio.

    python benchmarks/finetune_throughput.py [--data ../shared/data/hymenoptera_data] [--epochs 2]
    python benchmarks/finetune_throughput.py --decode exact --decode fast --epochs 1   # fast / exact
    python benchmarks/finetune_throughput.py --smoke    # seconds: generated images, 32 px, 1 epoch (checks it runs)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from featx.choices import DEFAULT_DECODE, TRAIN_DECODES
from featx.finetuning import finetune
from featx.runtime import default_workers, resolve_runtime

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hymenoptera_data"


def tutorial_loop(train_dir: Path, epochs: int, batch_size: int, image_size: int, device: str) -> float:
    """The PyTorch transfer-learning tutorial's training loop; returns the last epoch's training images per second."""
    tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Linear(model.fc.in_features, len(dataset.classes))
    model = model.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    speed = 0.0
    for _ in range(epochs):
        model.train()
        seen, start = 0, time.perf_counter()
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        speed = seen / (time.perf_counter() - start)
    return speed


def featx_loop(data: Path, epochs: int, batch_size: int, image_size: int, device: str,
               decode: str = DEFAULT_DECODE) -> float:
    """featx.finetune on the same data (--decode `decode`); returns the last epoch's training images per second."""
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(str(data), Path(tmp) / "run", backbone="resnet18", weights="none", epochs=epochs,
                          batch_size=batch_size, image_size=image_size, optimizer="sgd", lr=0.01, schedule="none",
                          device=device, decode=decode)
    return result.history[-1]["images_per_second"]


def pure_training_step(batch_size: int, image_size: int, device: str, steps: int = 5) -> float:
    """resnet18 training steps (forward, backward, SGD step) on one random batch at featx's precision and memory
    format; images per second."""
    runtime = resolve_runtime(device)
    torch.manual_seed(0)
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=2).to(runtime.device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size, device=runtime.device).contiguous(memory_format=layout)
    y = torch.randint(0, 2, (batch_size,), device=runtime.device)

    def step():
        with runtime.autocast():
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def write_smoke_data(root: Path, per_class: int = 12, size: int = 48) -> Path:
    """A tiny train/ + val/ ImageFolder of random JPEGs (2 classes) for --smoke."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageFolder with train/ (and val/)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loop; the last one is timed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="device of both loops (default: cpu)")
    parser.add_argument("--decode", action="append", choices=TRAIN_DECODES,
                        help="time featx finetune with this --decode (give it twice to compare modes; no tutorial loop)")
    parser.add_argument("--smoke", action="store_true",
                        help="generated images, 32 px, batch 4, 1 epoch: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.data, args.epochs, args.batch_size, args.image_size = write_smoke_data(Path(tmp)), 1, 4, 32
            (compare_decodes if args.decode else run)(args)
        return
    (compare_decodes if args.decode else run)(args)


def describe_machine(args) -> None:
    """The CPU's capability and flags that decide bf16 speed, the data and the settings."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, flags "
          f"{' '.join(shown) or 'none of avx2/avx512/amx'}")
    print(f"data {args.data}, resnet18 -w none, batch {args.batch_size}, {args.image_size} px, "
          f"{args.epochs} epochs each, torch {torch.__version__}, {torch.get_num_threads()} threads")


def compare_decodes(args) -> None:
    """featx finetune once per --decode mode on args.data; the last epoch's img/s of each, and their ratios."""
    describe_machine(args)
    speeds = {}
    for mode in args.decode:
        speeds[mode] = featx_loop(args.data, args.epochs, args.batch_size, args.image_size, args.device, mode)
        print(f"featx finetune --decode {mode} ({resolve_runtime(args.device).describe()}, {default_workers()} "
              f"workers)  {speeds[mode]:7.1f} img/s")
    first = args.decode[0]
    for mode in args.decode[1:]:
        print(f"ratio {mode} / {first}: {speeds[mode] / speeds[first]:.2f}")


def run(args) -> None:
    """Both loops on args.data, then the ratio."""
    describe_machine(args)
    ours = featx_loop(args.data, args.epochs, args.batch_size, args.image_size, args.device)
    print(f"featx finetune ({resolve_runtime(args.device).describe()}, {default_workers()} workers)  {ours:7.1f} img/s")
    theirs = tutorial_loop(args.data / "train", args.epochs, args.batch_size, args.image_size, args.device)
    print(f"tutorial's loop ({args.device} fp32, no workers)  {theirs:7.1f} img/s")
    pure = pure_training_step(args.batch_size, args.image_size, args.device)
    print(f"pure training step ({resolve_runtime(args.device).describe()}, no data)  {pure:7.1f} img/s")
    print(f"ratio featx / tutorial: {ours / theirs:.2f}  (target >= 2.5); featx / pure step {ours / pure:.2f}; "
          f"pure step / tutorial {pure / theirs:.2f} (the most the ratio can be at this precision)")


if __name__ == "__main__":
    main()
