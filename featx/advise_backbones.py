"""`featx advise` across backbones: the same measurement as featx.advise for every `-b`/`-w` pair, on the same
class-balanced images, and one ranking of every backbone x tap.

The budget covers all the backbones: each extracts the same images per class (the most that the sum of their
seconds per image affords), into a store of its own beside `-o`, so the learning curves compare the backbones on
equal rows. Every tap of every backbone is a candidate, with its probe's accuracy projected to the full data (the
curve's last point plus its slope, as featx.advise projects its recommendation) and that accuracy's 95 % range, the
seconds per image to extract it and the size of its rows. The best candidate is the most accurate (projections
capped at 100 % are told apart by the curve's recent points, as featx.advise scores taps); the cheapest is
the fastest to extract (then the smallest rows) among those within WITHIN of the best, projected and on the curve.
The recommendation is the best candidate's backbone with that backbone's own advice (probe at the candidate's tap,
or finetune when its measurement says so).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .advice import (DECODE_FACTOR, DEFAULT_BUDGET_SHARE, FINETUNE_EPOCHS, Advice, Choice, accuracy_range,
                     advice_path, advice_taps, check_request, curve_name, extract_measured, measure_costs, project,
                     recent_mean, recommend)
from .advise_options import AdviseOptions
from .options import OptionError

SCHEMA = 3  # featx.advise's schema 2 fields (of the recommended backbone) plus `backbones` and `candidates`
WITHIN = 0.01  # accuracy given up for a cheaper candidate


@dataclass
class Candidate:
    """One backbone x tap: its probe's projected accuracy and range, extraction seconds per image, row size."""

    backbone: str
    weights: str
    store: str
    tap: str
    normalize: str
    accuracy: float  # projected to the full data (capped at 1)
    curve_accuracy: float  # the curve's points within a doubling of its last (ranks candidates the cap ties)
    expected_accuracy: tuple[float, float]
    extract_seconds_per_image: float
    embedding_size: int
    command: str


@dataclass
class Comparison:
    advices: list[Advice]
    candidates: list[Candidate]
    best: Candidate
    cheapest: Candidate
    recommendation: Choice
    budget_seconds: float = 0.0
    seconds: float = 0.0
    saved: str = ""  # where the comparison's JSON was written

    def chosen(self) -> Advice:
        return next(a for a in self.advices if a.store == self.best.store)

    def to_dict(self) -> dict:
        """The recommended backbone's advice (featx.advise's fields; its recommendation the overall one), with every
        backbone's advice and the ranked candidates."""
        top = self.chosen().to_dict()
        return {**top, "schema": SCHEMA, "budget_seconds": self.budget_seconds, "seconds": self.seconds,
                "recommendation": asdict(self.recommendation), "best": asdict(self.best),
                "cheapest": asdict(self.cheapest), "candidates": [asdict(c) for c in self.candidates],
                "backbones": [a.to_dict() for a in self.advices]}

    def table(self) -> str:
        """The table `featx advise` prints for several backbones."""
        a = self.chosen()
        lines = [f"{a.data}: {a.images} images, {a.classes} classes (smallest {a.per_class}); {len(self.advices)} "
                 f"backbones on {a.extracted_per_class} images per class each; {self.seconds:.0f} s of a "
                 f"{self.budget_seconds:.0f} s budget", ""]
        rows = [("", "backbone (weights)", "tap", "expected acc %", "s/image", "row size")]
        for c in self.candidates:
            mark = "best" if c is self.best else ""
            mark += ("+" if mark else "") + "cheapest" if c is self.cheapest else ""
            lo, hi = c.expected_accuracy
            weights = Path(c.weights.removeprefix("file:")).name
            rows.append((mark, f"{c.backbone} ({weights})", curve_name(c.tap, c.normalize),
                         f"{100 * lo:.1f}-{100 * hi:.1f}", f"{c.extract_seconds_per_image:.4f}", str(c.embedding_size)))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines += ["  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                  for r in rows]
        r = self.recommendation
        what = {"probe": f"probe at {curve_name(r.tap, r.normalize)}", "finetune": "full finetune",
                "finetune-freeze": f"finetune --freeze {r.freeze}"}[r.method]
        lines += ["", f"recommended: {what} on {self.best.backbone} ({a.signal['reason']})", f"  {r.command}"]
        if self.cheapest is not self.best:
            c = self.cheapest
            ratio = self.best.extract_seconds_per_image / max(1e-12, c.extract_seconds_per_image)
            lines += [f"cheapest within {100 * WITHIN:.0f} point of it: probe at {curve_name(c.tap, c.normalize)} on "
                      f"{c.backbone}, {ratio:.1f}"
                      f"x faster to extract", f"  {c.command}"]
        return "\n".join(lines)


def backbone_store(base: Path, backbone: str, weights: str) -> Path:
    """The store of one backbone beside `base` (base.<backbone>-<weights>.h5)."""
    from .backbones.weights import looks_like_path

    tag = Path(weights).stem if looks_like_path(weights) else weights
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{backbone}-{tag}")
    return base.with_name(f"{base.stem}.{slug}{base.suffix}")


def advise_backbones(data, specs: list[tuple[str | None, str, str]], *, store=None, image_size: int | None = None,
                     budget_seconds: float | None = None, seed: int = 0, log=None) -> Comparison:
    """`featx advise` with several backbones: `specs` lists (backbone, weights, weights_match). Every backbone is
    loaded (so weights that cannot be had offline are reported) and its costs measured before any extraction; the
    budget (default: the sum of each backbone's default) covers them all. Saves each backbone's advice beside its
    store and the comparison beside `store` (default DATA-name.featx.h5, which names the stores)."""
    from .backbones import load_backbone

    started = time.perf_counter()
    log = log or (lambda line: None)
    AdviseOptions.of(locals())  # an OptionError for a value the option does not take
    source, counts = check_request(data)
    seen: set = set()
    loaded = []
    for name, weights, match in specs:
        bb = load_backbone(name, weights, match=match)
        if (bb.name, str(weights)) in seen:
            raise OptionError("{backbone=} {weights=}: listed twice; give each backbone (and weights) once",
                              backbone=bb.name, weights=weights)
        seen.add((bb.name, str(weights)))
        costs = measure_costs(bb.model, image_size or bb.transform.crop)
        loaded.append((bb.name, str(weights), match, advice_taps(bb.model), costs))
        del bb
    k, n_images, per_class = len(counts), sum(counts.values()), min(counts.values())
    per_image = [c["forward_seconds_per_image"] * DECODE_FACTOR for *_, c in loaded]
    budget = budget_seconds if budget_seconds is not None else sum(
        DEFAULT_BUDGET_SHARE * c["train_seconds_per_image"] * n_images * FINETUNE_EPOCHS for *_, c in loaded)
    take = int(min(0.8 * budget / (sum(per_image) * k), max(counts.values())))
    if take < 2:
        need = 2 * k * sum(per_image) / 0.8
        raise OptionError("{budget_seconds=}: too small to compare %d backbones here; extracting the minimum (2 "
                          "images per class, %d images) with each takes about %.1f s on this machine: pass at least "
                          "{budget_seconds=%d}" % (len(specs), 2 * k, need, math.ceil(need)),
                          budget_seconds=float(f"{budget:g}"))
    base = Path(store) if store is not None else Path(f"{Path(str(data)).name or 'data'}.featx.h5")
    stores = [backbone_store(base, name, weights) for name, weights, *_ in loaded]
    for (name, weights, match, taps, costs), path in zip(loaded, stores):
        result = extract_measured(data, source, counts, path, take, seed, budget, log, backbone=name,
                                  weights=weights, weights_match=match, taps=taps, image_size=image_size)
        costs["extract_seconds"] = result.seconds
    advices = []
    for i, ((name, weights, match, taps, costs), path) in enumerate(zip(loaded, stores)):
        now = time.perf_counter()
        share = max(1e-9, (budget - (now - started)) / (len(loaded) - i))  # what is left, shared by those left
        full_ft = costs["train_seconds_per_image"] * n_images * FINETUNE_EPOCHS
        advice = recommend(path, per_class_full=per_class, costs={**costs, "full_finetune_seconds": full_ft},
                           budget_seconds=share, seed=seed, started=now, command_data=str(data),
                           image_size=image_size)
        advice.images, advice.classes, advice.extracted_per_class = n_images, k, min(take, per_class)
        advice.seconds = time.perf_counter() - now
        advice_path(path).write_text(json.dumps(advice.to_dict(), indent=2, default=str))
        advices.append(advice)
    comparison = compare(advices)
    comparison.budget_seconds, comparison.seconds = float(budget), time.perf_counter() - started
    comparison.saved = str(advice_path(base))
    Path(comparison.saved).write_text(json.dumps(comparison.to_dict(), indent=2, default=str))
    return comparison


def candidates_of(advice: Advice) -> list[Candidate]:
    """Every tap of one backbone's advice as a candidate (at the normalisation its advice chose for that tap), the
    tap its advice picked first (the ranking is stable: it wins a tie)."""
    from .store import open_store

    with open_store(advice.store) as s:
        sizes = {t: int(math.prod(s.features(t).shape[1:])) for t in s.taps}
    per_image = advice.costs["forward_seconds_per_image"] * DECODE_FACTOR
    head_dir = Path(advice.store).with_name(Path(advice.store).stem + "-head")
    out = []
    taps = sorted(advice.signal["normalize"], key=lambda t: t != advice.signal["best_tap"])  # its own pick first
    for tap in taps:
        norm = advice.signal["normalize"][tap]
        curve = advice.curves[curve_name(tap, norm)]
        accuracy, _ = project(curve, advice.per_class)
        scaling = "" if norm == "standard" else f" --normalize {norm}"
        out.append(Candidate(advice.backbone, advice.weights, advice.store, tap, norm, accuracy, recent_mean(curve),
                             accuracy_range(accuracy, advice.signal["held_out"]), per_image, sizes[tap],
                             f"featx fit-head {advice.store} -l {tap}{scaling} -o {head_dir}"))
    return out


def compare(advices: list[Advice]) -> Comparison:
    """Rank every backbone x tap of `advices`; the recommendation is the best candidate's backbone's own advice,
    probing at the best candidate's tap unless that advice is to finetune."""
    candidates = sorted((c for a in advices for c in candidates_of(a)),
                        key=lambda c: (-c.accuracy, -c.curve_accuracy, c.extract_seconds_per_image, c.embedding_size))
    best = candidates[0]
    close = [c for c in candidates if c.accuracy >= best.accuracy - WITHIN  # and measured as close (a cap ties)
             and c.curve_accuracy >= best.curve_accuracy - WITHIN]
    cheapest = min(close, key=lambda c: (c.extract_seconds_per_image, c.embedding_size, -c.accuracy,
                                         -c.curve_accuracy))
    own = next(a for a in advices if a.store == best.store).recommendation
    recommendation = own if own.method != "probe" else Choice(
        "probe", best.tap, None, best.normalize, best.expected_accuracy, own.seconds, best.command)
    return Comparison(advices, candidates, best, cheapest, recommendation)
