"""Machine info, the result table (CSV + Markdown) and the plots. Every number comes from the run's records."""
from __future__ import annotations

import csv
import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np

FIELDS = ["target", "method", "tap", "normalize", "n", "seed", "n_train", "acc", "seconds", "images", "backward", "epochs", "lr",
          "batch_size", "augment", "detail"]
METHOD_LABELS = {
    "probe": "(a) probe: extract once + fit-head",
    "fixed": "(b) fixed extractor: --freeze backbone",
    "finetune": "(c) full finetune: --freeze none",
    "probe+ft": "(d) probe then finetune: --init-head",
    "scratch": "(e) from scratch: -w none",
    "partial": "(f) partial finetune: --freeze until:TAP",
}
SHORT_LABELS = {"probe": "(a) probe", "fixed": "(b) frozen backbone", "finetune": "(c) finetune",
                "probe+ft": "(d) probe + finetune", "scratch": "(e) scratch",
                "partial": "(f) partial finetune"}
METHOD_ORDER = ["probe", "fixed", "finetune", "probe+ft", "scratch", "partial"]
FINETUNE_METHODS = ("finetune", "probe+ft", "fixed", "scratch", "partial")  # the summary's order
MARKERS = {"probe": "o", "fixed": "s", "finetune": "^", "probe+ft": "D", "scratch": "x", "partial": "v"}


def machine_info() -> dict:
    import torch
    import torchvision

    import featx
    from featx.runtime import resolve_runtime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    runtime = resolve_runtime("auto", "auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "device": str(runtime.device),
        "precision": runtime.precision,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "featx": featx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, device {info['device']} "
            f"({info['precision']}){gpu}; torch {info['torch']}, torchvision {info['torchvision']}, featx {info['featx']}, "
            f"Python {info['python']}")


def write_csv(path: Path, records: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({k: _fmt_cell(r.get(k)) for k in FIELDS})


def _fmt_cell(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def aggregate(records: list[dict]) -> dict:
    """(target, method, tap, n) -> {acc_mean, acc_std, k, seconds, images} averaged over seeds; a probe's tap
    carries its normalisation (featx.advice.curve_name: TAP/none for unscaled rows)."""
    from featx.advice import curve_name
    groups = defaultdict(list)
    for r in records:
        groups[(r["target"], r["method"], curve_name(r.get("tap") or "", r.get("normalize")), r["n"])].append(r)
    out = {}
    for key, rs in groups.items():
        accs = np.array([r["acc"] for r in rs], dtype=float)
        out[key] = {
            "acc_mean": float(accs.mean()),
            "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "k": len(rs),
            "seconds": float(np.mean([r["seconds"] for r in rs])),
            "images": float(np.mean([r["images"] for r in rs])),
        }
    return out


def targets_of(records) -> list[str]:
    seen = []
    for r in records:
        if r["target"] not in seen:
            seen.append(r["target"])
    return seen


def _sizes(agg, target, method=None, tap=None) -> list[int]:
    return sorted({k[3] for k in agg if k[0] == target and (method is None or k[1] == method)
                   and (tap is None or k[2] == tap)})


def crossover(agg, target: str, method: str, main_tap: str) -> int | None:
    """Smallest n from which `method`'s mean accuracy is >= the probe's at that n and at every larger n."""
    sizes = [n for n in _sizes(agg, target, "probe", main_tap) if (target, method, "", n) in agg]
    found = None
    for n in reversed(sizes):
        if agg[(target, method, "", n)]["acc_mean"] >= agg[(target, "probe", main_tap, n)]["acc_mean"]:
            found = n
        else:
            break
    return found


def summary(agg, target: str, main_tap: str) -> dict:
    """Crossover n per finetuning method and the probe-vs-finetune gaps at the smallest and largest n."""
    sizes = _sizes(agg, target, "probe", main_tap)
    out = {"target": target, "crossover": {}, "gap": {}}
    for m in FINETUNE_METHODS:
        if any(k[0] == target and k[1] == m for k in agg):
            out["crossover"][m] = crossover(agg, target, m, main_tap)
    for n in (sizes[0], sizes[-1]) if sizes else ():
        probe = agg[(target, "probe", main_tap, n)]
        row = {"probe": probe["acc_mean"]}
        for m in FINETUNE_METHODS:
            if (target, m, "", n) in agg:
                row[m] = agg[(target, m, "", n)]["acc_mean"]
                row[f"{m}-probe"] = agg[(target, m, "", n)]["acc_mean"] - probe["acc_mean"]
                row[f"{m}/probe seconds"] = agg[(target, m, "", n)]["seconds"] / max(probe["seconds"], 1e-9)
        out["gap"][n] = row
    return out


def _cell(a) -> str:
    s = f"{100 * a['acc_mean']:.1f}"
    if a["k"] > 1:
        s += f" ± {100 * a['acc_std']:.1f}"
    return s


def _secs(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def result_of(agg, target: str, method: str, main_tap: str, n: int) -> dict | None:
    """The aggregate of one method at one n (the probe's at the main tap), or None when it did not run."""
    return agg.get((target, method, main_tap if method == "probe" else "", n))


def table_rows(agg, target: str, methods: list[str], main_tap: str, sizes: list[int], cell, label=str) -> list[str]:
    """Markdown rows, one per n: label(n), then cell(aggregate) per method (empty where it did not run)."""
    rows = []
    for n in sizes:
        cells = [cell(a) if (a := result_of(agg, target, m, main_tap, n)) else "" for m in methods]
        rows.append(f"| {label(n)} | " + " | ".join(cells) + " |")
    return rows


def method_series(agg, target: str, main_tap: str):
    """(method, sizes, aggregates) for each method with results on target, in table order."""
    for m in METHOD_ORDER:
        tap = main_tap if m == "probe" else ""
        sizes = _sizes(agg, target, m, tap)
        if sizes:
            yield m, sizes, [agg[(target, m, tap, n)] for n in sizes]


def markdown(title: str, info: dict, setup_lines: list[str], records: list[dict], main_taps: dict[str, str],
             extra_sections: list[str] = ()) -> str:
    agg = aggregate(records)
    lines = [f"# {title}", "", f"Machine: {machine_line(info)}.", ""]
    lines += setup_lines
    for target in targets_of(records):
        main_tap = main_taps.get(target, "avgpool")
        methods = [m for m in METHOD_ORDER if any(k[0] == target and k[1] == m for k in agg)]
        sizes = _sizes(agg, target)
        lines += ["", f"## {target}: accuracy on the held-out val images (%, mean ± sd over seeds)", ""]
        lines.append("| n/class | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |")
        lines.append("|---:|" + "---:|" * len(methods))

        def with_seeds(n, target=target, methods=methods, main_tap=main_tap):
            k = max((a["k"] for m in methods if (a := result_of(agg, target, m, main_tap, n))), default=1)
            return f"{n}{' (' + str(k) + ' seeds)' if k > 1 else ''}"

        lines += table_rows(agg, target, methods, main_tap, sizes, _cell, with_seeds)
        lines += ["", f"## {target}: cost per run (wall seconds / images through the backbone)", ""]
        lines.append("| n/class | " + " | ".join(m for m in methods) + " |")
        lines.append("|---:|" + "---:|" * len(methods))
        lines += table_rows(agg, target, methods, main_tap, sizes,
                            lambda a: f"{_secs(a['seconds'])} s / {a['images']:,.0f}")
        taps = sorted({k[2] for k in agg if k[0] == target and k[1] == "probe"}, key=_tap_order)
        if len(taps) > 1:
            lines += ["", f"## {target}: probe accuracy per tap (%, logistic head, C by cross-validation; TAP = "
                      "standardised rows, TAP/none = unscaled)", ""]
            lines.append("| n/class | " + " | ".join(taps) + " |")
            lines.append("|---:|" + "---:|" * len(taps))
            for n in _sizes(agg, target, "probe"):
                cells = [_cell(agg[(target, "probe", t, n)]) if (target, "probe", t, n) in agg else "" for t in taps]
                best = max(taps, key=lambda t: agg.get((target, "probe", t, n), {"acc_mean": -1})["acc_mean"])
                cells = [f"**{c}**" if t == best else c for c, t in zip(cells, taps)]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
        s = summary(agg, target, main_tap)
        lines += ["", f"## {target}: summary", ""]
        for m, n in s["crossover"].items():
            if n is None:
                lines.append(f"- {SHORT_LABELS[m]}: below the probe at the largest tested n (no crossover).")
            else:
                lines.append(f"- {SHORT_LABELS[m]}: matches or beats the probe from n = {n} per class on (mean over seeds).")
        for n, row in s["gap"].items():
            parts = [f"{m} {100 * row[m + '-probe']:+.1f} pts ({row[m + '/probe seconds']:.1f}x the probe's seconds)"
                     for m in FINETUNE_METHODS if m in row]
            lines.append(f"- n = {n}: probe {100 * row['probe']:.1f} %; vs probe: " + ", ".join(parts) + ".")
    lines += list(extra_sections)
    return "\n".join(lines) + "\n"


def _tap_order(tap: str):
    order = ["layer1", "layer2", "layer3", "layer4", "avgpool", "flatten"]
    return (order.index(tap) if tap in order else len(order), tap)


def plots(prefix: Path, records: list[dict], main_taps: dict[str, str], title: str) -> list[Path]:
    """accuracy vs n and cost vs n per target (log x), per-tap probe accuracy; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records)
    targets = targets_of(records)
    written = []

    fig, axes = plt.subplots(1, len(targets), figsize=(6.2 * len(targets), 4.6), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for m, sizes, results in method_series(agg, target, main_taps.get(target, "avgpool")):
            ax.errorbar(sizes, [100 * a["acc_mean"] for a in results], yerr=[100 * a["acc_std"] for a in results],
                        marker=MARKERS[m], capsize=3, label=METHOD_LABELS[m])
        _style_n_axis(ax, _sizes(agg, target), "val accuracy (%)", target)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy vs n (mean ± sd over seeds)")
    fig.tight_layout()
    written.append(_save(fig, prefix.with_name(prefix.name + "-accuracy.png")))

    fig, axes = plt.subplots(2, len(targets), figsize=(6.2 * len(targets), 8.4), squeeze=False)
    for col, target in enumerate(targets):
        for m, sizes, results in method_series(agg, target, main_taps.get(target, "avgpool")):
            for row, key in ((0, "seconds"), (1, "images")):
                axes[row][col].plot(sizes, [a[key] for a in results], marker=MARKERS[m], label=METHOD_LABELS[m])
        for row, label in ((0, "wall seconds per run"), (1, "images through the backbone")):
            axes[row][col].set_yscale("log")
            _style_n_axis(axes[row][col], _sizes(agg, target), label, target)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: cost vs n")
    fig.tight_layout()
    written.append(_save(fig, prefix.with_name(prefix.name + "-cost.png")))

    tap_targets = [t for t in targets if len({k[2] for k in agg if k[0] == t and k[1] == "probe"}) > 1]
    if tap_targets:
        fig, axes = plt.subplots(1, len(tap_targets), figsize=(6.2 * len(tap_targets), 4.4), squeeze=False)
        for ax, target in zip(axes[0], tap_targets):
            taps = sorted({k[2] for k in agg if k[0] == target and k[1] == "probe"}, key=_tap_order)
            for tap in taps:
                sizes = _sizes(agg, target, "probe", tap)
                ax.errorbar(sizes, [100 * agg[(target, "probe", tap, n)]["acc_mean"] for n in sizes],
                            yerr=[100 * agg[(target, "probe", tap, n)]["acc_std"] for n in sizes], marker="o",
                            capsize=3, label=f"probe @ {tap}")
            _style_n_axis(ax, _sizes(agg, target, "probe"), "val accuracy (%)", target)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: probe accuracy per tap")
        fig.tight_layout()
        written.append(_save(fig, prefix.with_name(prefix.name + "-taps.png")))
    return written


def _style_n_axis(ax, sizes, ylabel: str, title: str) -> None:
    """An axis with n per class on a log x axis, labelled and gridded."""
    _log_x(ax, sizes)
    ax.set_xlabel("training images per class (n)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def _log_x(ax, sizes) -> None:
    """Log x axis labelled with the tested n values themselves."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(sizes))))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {int(round(s % 60))} s"
