"""The run: workloads x quantities x contenders, one row per (workload, quantity, contender)."""
from __future__ import annotations

import gc
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .contenders import MAKERS, NOTES, contenders_for, first_line, opacus_available, \
    quiet_warnings
from .memory import MemoryRunner
from .timing import time_interleaved
from .workloads import WORKLOADS, Setup, prepare


@dataclass
class Options:
    """What to run and how. ``quantities`` None: each workload's own list."""
    workloads: list
    quantities: Optional[list] = None
    device: str = "cpu"
    threads: int = 2
    warmup: int = 1
    repeats: int = 7
    budget_s: float = 6.0
    batch_size: Optional[int] = None
    vectors: int = 1
    memory: bool = True
    max_memory_gib: float = 8.0
    child_timeout_s: float = 300.0
    inductor: bool = False
    quick: bool = False

    def quantities_of(self, workload: str) -> list:
        return list(self.quantities or WORKLOADS[workload].quantities)

    def batch_of(self, workload: str) -> int:
        return self.batch_size or WORKLOADS[workload].batch_size


def _row(workload, quantity, contender, times=None, error=None, peak=None, first_ms=None,
         compile_s=None) -> dict:
    return {"workload": workload, "quantity": quantity, "contender": contender,
            "median_ms": statistics.median(times) if times else None,
            "min_ms": min(times) if times else None,
            "times_ms": [round(t, 4) for t in times or []], "x_autograd": None,
            "x_backpack": None, "peak_mib": peak, "first_ms": first_ms, "compile_s": compile_s,
            "error": error, "note": NOTES.get(quantity) if contender == "BackPACK" else None}


def _with_ratios(rows: list) -> list:
    """Fill ``x_autograd`` and ``x_backpack``: each median over the same cell's reference."""
    ref = {}
    for row in rows:
        if row["median_ms"] is not None and row["contender"] in ("autograd", "BackPACK"):
            ref[(row["workload"], row["quantity"], row["contender"])] = row["median_ms"]
    for row in rows:
        if row["median_ms"] is None:
            continue
        for key, name in (("x_autograd", "autograd"), ("x_backpack", "BackPACK")):
            base = ref.get((row["workload"], row["quantity"], name))
            row[key] = row["median_ms"] / base if base else None
    return rows


def _build(names: list, setup: Setup, quantity: str) -> tuple[dict, dict]:
    """Construct each contender; ``(built, errors)``."""
    built, errors = {}, {}
    for name in names:
        try:
            built[name] = MAKERS[name](setup, quantity)
        except Exception as exc:  # noqa: BLE001 - shown as a footnote
            errors[name] = first_line(exc)
    return built, errors


def _peaks(opts: Options, built: dict, workload: str, quantity: str, memory,
           autograd_peak: dict, errors: dict) -> dict:
    """Peak memory of each built contender in its own process; a failed run removes the
    contender from ``built`` and records why in ``errors``."""
    peaks = {}
    for name in list(built) if memory is not None else []:
        spec = dict(workload=workload, quantity=quantity, contender=name, device=opts.device,
                    threads=opts.threads, batch_size=opts.batch_size, vectors=opts.vectors)
        if name == "autograd" and autograd_peak:
            result = autograd_peak
        else:
            result = memory.measure(spec)
            if name == "autograd":
                autograd_peak.update(result)
        if "error" in result:
            errors[name] = result["error"]
            del built[name]
        else:
            peaks[name] = result["peak_mib"]
    return peaks


def bench_cell(opts: Options, setup: Setup, workload: str, quantity: str, memory,
               autograd_peak: dict) -> list:
    """Rows of one (workload, quantity): build, measure memory, then time the contenders."""
    names = contenders_for(quantity, opacus_available(), opts.inductor)
    built, errors = _build(names, setup, quantity)
    compile_s = {name: fn.compile_s for name, fn in built.items()}
    peaks = _peaks(opts, built, workload, quantity, memory, autograd_peak, errors)
    times, first, failed = time_interleaved(built, opts.device, opts.warmup, opts.repeats,
                                            opts.budget_s)
    errors.update(failed)
    return [_row(workload, quantity, name, times.get(name), errors.get(name), peaks.get(name),
                 first.get(name), compile_s.get(name)) for name in names]


class _Counter:
    """Progress on stderr: one line per cell."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def set_description(self, text: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


def _progress(total: int):
    """A tqdm bar on stderr when tqdm is installed, else a plain counter."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True)
    except ImportError:
        return _Counter(total)


def run(opts: Options, checkpoint: Optional[Callable[[list], None]] = None) -> list:
    """Every row of the benchmark; ``checkpoint(rows)`` after each cell (so a run that dies
    leaves its results so far)."""
    torch.set_num_threads(opts.threads)
    quiet_warnings()
    memory = MemoryRunner(int(opts.max_memory_gib * 2**30), opts.child_timeout_s) \
        if opts.memory else None
    rows = []
    bar = _progress(sum(len(opts.quantities_of(w)) for w in opts.workloads))
    for workload in opts.workloads:
        setup = prepare(workload, opts.device, opts.batch_size, opts.vectors)
        autograd_peak: dict = {}
        for quantity in opts.quantities_of(workload):
            bar.set_description(f"{workload} {quantity}")
            rows += bench_cell(opts, setup, workload, quantity, memory, autograd_peak)
            if checkpoint is not None:
                checkpoint(_with_ratios(rows))
            bar.update()
            gc.collect()
    bar.close()
    return _with_ratios(rows)
