"""The store rule under a long generated run: tests/reliability/store_machine.py driven for 500+ steps.

Each step is a real operation on one store (files added, removed, renamed, rewritten in three data folders; extract
mirroring, --prune or --overwrite; predict --store; a `featx extract` subprocess SIGKILLed at a drawn instant), and
after every step the machine checks that the store holds exactly the rows the rule allows, each (data, path) and
content key once, each row equal to a clean computation of its file's bytes, and no empty STORE.parts/. Prints the
machine, the load, the operations run and the wall time; any violation stops the run with hypothesis's shortest
failing sequence and exit status 1.

    python benchmarks/store_rules.py [--steps 500] [--per-example 50] [--kills-per-example 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reliability.store_machine import StoreMachine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="run examples until this many steps are done")
    parser.add_argument("--per-example", type=int, default=50, help="steps per generated example (at most)")
    parser.add_argument("--kills-per-example", type=int, default=4)
    args = parser.parse_args()

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load before {os.getloadavg()[0]:.2f}", flush=True)
    StoreMachine.max_kills = args.kills_per_example
    started = time.perf_counter()
    while StoreMachine.totals["steps"] < args.steps:
        examples = max(2, (args.steps - StoreMachine.totals["steps"]) // args.per_example + 1)
        run_settings = settings(max_examples=examples, stateful_step_count=args.per_example, deadline=None,
                                database=None, suppress_health_check=list(HealthCheck))
        try:
            run_state_machine_as_test(StoreMachine, settings=run_settings)
        except Exception as err:  # noqa: BLE001 - hypothesis has printed the failing sequence
            print(f"VIOLATION after {StoreMachine.totals['steps']} steps: {type(err).__name__}: {err}", flush=True)
            return 1
        print(f"  {StoreMachine.totals['steps']} steps, {time.perf_counter() - started:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    totals = StoreMachine.totals
    print(f"\n{totals['steps']} steps in {totals['examples']} examples, {seconds:.0f} s "
          f"({seconds / totals['steps']:.2f} s per step), load after {os.getloadavg()[0]:.2f}")
    for name, count in sorted(totals.items()):
        if name not in ("steps", "examples"):
            print(f"  {name:<26}{count:>6}")
    print("invariants held after every step: the rule's rows, unique (data, path) and keys, rows equal to a clean "
          "computation, no empty parts folder")
    return 0


if __name__ == "__main__":
    sys.exit(main())
