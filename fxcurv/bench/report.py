"""Tables and summaries of a run: the full table (one row per contender), the compact table
(one row per workload and quantity, errors as footnotes), the targets, the machine."""
from __future__ import annotations

import datetime
import math
import os
import platform
from typing import Optional

import torch

HEADERS = ["workload", "quantity", "contender", "median ms", "x autograd", "x BackPACK",
           "peak MiB", "1st call s"]
COMPACT_HEADERS = ["workload", "quantity", "fxcurv ms", "BackPACK ms", "autograd ms",
                   "fxcurv/BackPACK", "fxcurv/autograd", "peak MiB fxcurv", "peak MiB BackPACK",
                   "fxcurv 1st call s"]
TARGET_WORKLOADS = ("seed_cnn", "mlp", "3c3d")  # the workloads the first issue set targets on
GEOMEAN_TARGET = 0.6


def render(headers: list, lines: list, tablefmt: str = "github") -> str:
    """A table as Markdown (``github``) or space-aligned text (``plain``); other formats
    through ``tabulate`` when it is installed (``pip install fxcurv[bench]``)."""
    if tablefmt not in ("github", "plain"):
        try:
            from tabulate import tabulate
        except ImportError:
            raise SystemExit(f"--tablefmt {tablefmt} needs tabulate (pip install tabulate); "
                             "github and plain need nothing") from None
        return tabulate(lines, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    cells = [list(map(str, headers))] + [[str(c).replace("|", "\\|") for c in line]
                                         for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if tablefmt == "plain":
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                         for row in cells)
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def first_call_s(row: dict) -> Optional[float]:
    """Construction (fxcurv: ``fxcurv.compile``) plus the first call, in seconds."""
    if row.get("first_ms") is None:
        return None
    return (row.get("compile_s") or 0.0) + row["first_ms"] / 1e3


def table(rows: list, tablefmt: str = "github", width: int = 120) -> str:
    """The results, one row per contender; repeated workload/quantity names are left blank,
    errors take the place of the numbers."""
    lines, previous = [], (None, None)
    for row in rows:
        key = (row["workload"], row["quantity"])
        names = ["" if previous[0] == key[0] else key[0],
                 "" if previous == key else key[1], row["contender"]]
        previous = key
        if row["error"]:
            error = row["error"] if len(row["error"]) <= width else row["error"][:width - 3] + "..."
            lines.append(names + [error, "", "", "", ""])
            continue
        lines.append(names + [_cell(row["median_ms"], ".1f"), _cell(row["x_autograd"], ".2f"),
                              _cell(row["x_backpack"], ".2f"), _cell(row["peak_mib"], ".0f"),
                              _cell(first_call_s(row), ".2f")])
    return render(HEADERS, lines, tablefmt)


class Footnotes:
    """Numbered footnotes, one per distinct text."""

    def __init__(self):
        self.texts: list = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def lines(self) -> list:
        return [f"[{i}] {text}" for i, text in enumerate(self.texts, 1)]


def _compact_value(row: Optional[dict], key: str, fmt: str, notes: Footnotes) -> str:
    if row is None:
        return ""
    if row["error"]:
        return "–" + notes.mark(f"{row['contender']}: {row['error']}")
    text = _cell(row.get(key), fmt)
    calls = len(row.get("times_ms") or [])
    if key == "median_ms" and 0 < calls < 3:
        text += notes.mark(f"{calls} timed call{'s' if calls > 1 else ''} only: one round of "
                           "the cell took longer than --budget")
    return text


def compact_table(rows: list, tablefmt: str = "github") -> tuple[str, list]:
    """One row per (workload, quantity): fxcurv, BackPACK and autograd times, the ratios,
    peaks and fxcurv's first-call cost; errors and notes become numbered footnotes.
    Returns ``(table, footnote lines)``."""
    notes, lines = Footnotes(), []
    for (workload, quantity), cell in _cells(rows, with_errors=True).items():
        fx, bp, ag = cell.get("fxcurv"), cell.get("BackPACK"), cell.get("autograd")
        bp_ms = _compact_value(bp, "median_ms", ".1f", notes)
        if bp is not None and not bp["error"] and bp.get("note"):
            bp_ms += notes.mark(bp["note"])
        first = "" if fx is None or fx["error"] else _cell(first_call_s(fx), ".2f")
        lines.append([workload, quantity, _compact_value(fx, "median_ms", ".1f", notes), bp_ms,
                      _compact_value(ag, "median_ms", ".1f", notes),
                      _cell(_ratio(fx, bp), ".2f"), _cell(_ratio(fx, ag), ".2f"),
                      _cell((fx or {}).get("peak_mib"), ".0f"),
                      _cell((bp or {}).get("peak_mib"), ".0f"), first])
    return render(COMPACT_HEADERS, lines, tablefmt), notes.lines()


def _cells(rows: list, with_errors: bool = False) -> dict:
    """``{(workload, quantity): {contender: row}}``; failed rows only ``with_errors``."""
    cells: dict = {}
    for row in rows:
        if with_errors or row["median_ms"] is not None or row["peak_mib"] is not None:
            cells.setdefault((row["workload"], row["quantity"]), {})[row["contender"]] = row
    return cells


def _ratio(a: Optional[dict], b: Optional[dict], key: str = "median_ms") -> Optional[float]:
    if a is None or b is None or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def _geomean(ratios: dict) -> Optional[float]:
    values = [v for v in ratios.values() if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _by_workload(ratios: dict) -> dict:
    workloads = list(dict.fromkeys(k.split("/")[0] for k in ratios))
    return {w: _geomean({k: v for k, v in ratios.items() if k.split("/")[0] == w})
            for w in workloads}


def targets(rows: list) -> dict:
    """The targets, checked: fxcurv/BackPACK <= 1 per cell and the geometric mean over
    :data:`TARGET_WORKLOADS` <= :data:`GEOMEAN_TARGET`; batch_l2, sum_grad_squared, variance
    <= 1.5x autograd; diag_ggn_mc, kfac <= 2.5x autograd; batch_grad no slower than the
    fastest other per-sample method; peak memory <= BackPACK's (misses below 1 MiB or 2 % are
    not counted: page-granular measurement). Geometric means are also given per workload
    and over every cell, fxcurv/autograd per workload too; misses outside the target
    workloads are listed apart (``other_misses``)."""
    checked = _check_cells(rows)
    ratios = checked["fxcurv_over_backpack"]
    target_cells = {k: v for k, v in ratios.items() if k.split("/")[0] in TARGET_WORKLOADS}
    misses = checked["misses"]
    return {"fxcurv_over_backpack": ratios, "geomean_fxcurv_over_backpack": _geomean(target_cells),
            "geomean_cells": len(target_cells), "geomean_by_workload": _by_workload(ratios),
            "geomean_all_cells": _geomean(ratios), "geomean_target": GEOMEAN_TARGET,
            "fxcurv_over_autograd": checked["fxcurv_over_autograd"],
            "geomean_over_autograd_by_workload": _by_workload(checked["fxcurv_over_autograd"]),
            "misses": [m for m in misses if m.split("/")[0] in TARGET_WORKLOADS],
            "other_misses": [m for m in misses if m.split("/")[0] not in TARGET_WORKLOADS]}


def _check_cells(rows: list) -> dict:
    """Every cell against the targets: ratios to BackPACK and autograd, and the misses."""
    misses, ratios, over_autograd = [], {}, {}
    limits = {"batch_l2": 1.5, "sum_grad_squared": 1.5, "variance": 1.5, "diag_ggn_mc": 2.5,
              "kfac": 2.5}
    for (workload, quantity), cell in _cells(rows).items():
        fx, where = cell.get("fxcurv"), f"{workload}/{quantity}"
        r = _ratio(fx, cell.get("BackPACK"))
        if r is not None:
            ratios[where] = r
            if r > 1.0:
                misses.append(f"{where}: time fxcurv/BackPACK {r:.2f} > 1.0")
        r = _ratio(fx, cell.get("autograd"))
        if r is not None:
            over_autograd[where] = r
        if quantity in limits and r is not None and r > limits[quantity]:
            misses.append(f"{where}: time fxcurv/autograd {r:.2f} > {limits[quantity]}")
        misses += _batch_grad_miss(where, quantity, cell) + _memory_miss(where, cell)
    return {"fxcurv_over_backpack": ratios, "fxcurv_over_autograd": over_autograd,
            "misses": misses}


def _batch_grad_miss(where: str, quantity: str, cell: dict) -> list:
    """batch_grad slower than vmap(grad) or Opacus (slower than BackPACK is counted above)."""
    fx = cell.get("fxcurv")
    others = [c for n, c in cell.items() if n in ("BackPACK", "vmap(grad)", "Opacus")
              and c.get("median_ms") is not None]
    if quantity != "batch_grad" or not fx or fx.get("median_ms") is None or not others:
        return []
    best = min(others, key=lambda c: c["median_ms"])
    if fx["median_ms"] > best["median_ms"] and best["contender"] != "BackPACK":
        return [f"{where}: time fxcurv/{best['contender']} "
                f"{fx['median_ms'] / best['median_ms']:.2f} > 1.0"]
    return []


def _memory_miss(where: str, cell: dict) -> list:
    mine = (cell.get("fxcurv") or {}).get("peak_mib")
    theirs = (cell.get("BackPACK") or {}).get("peak_mib")
    if mine is not None and theirs is not None and mine > theirs + max(1.0, theirs / 50):
        return [f"{where}: peak memory fxcurv {mine:.0f} MiB > BackPACK {theirs:.0f} MiB"]
    return []


def machine(device: str) -> dict:
    """Date, CPU model (as ``lscpu``'s "Model name"), cores, library versions, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "backpack": _version("backpack-for-pytorch"), "opacus": _version("opacus"),
            "device": device, "gpu": None, "cuda": None}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def header(meta: dict) -> str:
    """Where, when and how the run was measured."""
    load, gpu = meta["loadavg_1min"], f" ({meta['gpu']}, CUDA {meta['cuda']})" \
        if meta.get("gpu") else ""
    return (f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch "
            f"{meta['torch']}, BackPACK {meta['backpack']}, Opacus "
            f"{meta['opacus'] or 'not installed'}, {meta['threads']} threads, device "
            f"{meta['device']}{gpu}; load average {load['start']} at the start, {load['end']} "
            f"at the end; {meta['seconds']:.0f} s.")


def quick_note(meta: dict) -> list:
    if not meta.get("quick"):
        return []
    sizes = ", ".join(f"{w} {n}" for w, n in meta["batch_sizes"].items())
    return [f"Quick smoke run (`--quick`): batch {sizes}, at most {meta['repeats']} timed "
            "calls per contender. Real measurements of these small settings, not comparable "
            "with the full benchmark.", ""]


def summary(meta: dict, rows: list, checked: dict) -> list:
    """Load warning, geometric means, first-call cost, misses: lines of text."""
    lines = []
    busiest = max([v for v in meta["loadavg_1min"].values() if v is not None], default=None)
    if busiest is not None and busiest > (meta["cores"] or 1) + 0.5:
        lines += [f"Warning: load average {busiest:.1f} on {meta['cores']} cores: other "
                  "processes competed for the CPU, the timings are unreliable.", ""]
    geomean = checked["geomean_fxcurv_over_backpack"]
    if geomean is not None:
        lines.append(f"Geometric mean of fxcurv/BackPACK time over the "
                     f"{checked['geomean_cells']} cells of {', '.join(TARGET_WORKLOADS)}: "
                     f"{geomean:.2f} (target <= {checked['geomean_target']}).")
    if checked["geomean_all_cells"] is not None:
        lines.append(f"Over all {len(checked['fxcurv_over_backpack'])} cells: "
                     f"{checked['geomean_all_cells']:.2f}; by workload: "
                     + _pairs(checked["geomean_by_workload"]) + ".")
    if checked["geomean_over_autograd_by_workload"]:
        lines.append("Geometric mean of fxcurv/autograd time by workload: "
                     + _pairs(checked["geomean_over_autograd_by_workload"]) + ".")
    lines += first_call_lines(rows)
    for title, key in (("Cells missing the targets:", "misses"),
                       ("Outside those workloads, the same lines missed:", "other_misses")):
        if checked[key]:
            lines += ["", title, ""] + [f"- {miss}" for miss in checked[key]]
    return lines


def _pairs(values: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items() if v is not None)


def first_call_lines(rows: list) -> list:
    """fxcurv's first-call cost per workload: ``fxcurv.compile`` plus the first call (which
    also runs what a step does once), excluded from the timed calls."""
    per_workload: dict = {}
    for row in rows:
        if row["contender"] == "fxcurv" and first_call_s(row) is not None:
            per_workload.setdefault(row["workload"], []).append(
                (first_call_s(row), row["compile_s"] or 0.0))
    if not per_workload:
        return []
    parts = [f"{w} {min(v)[0]:.2f}-{max(v)[0]:.2f} s (compile {min(c for _, c in v):.2f}-"
             f"{max(c for _, c in v):.2f} s)" for w, v in per_workload.items()]
    return ["fxcurv's first call (`fxcurv.compile` + first call, not timed), range over the "
            "quantities: " + "; ".join(parts) + "."]


def report(meta: dict, rows: list, checked: dict, tablefmt: str = "github") -> str:
    """Header, the full table, and the summary: what ``python -m fxcurv.bench`` prints."""
    lines = [header(meta), ""] + quick_note(meta) + [f"`{meta['command']}`", "",
                                                     table(rows, tablefmt), ""]
    return "\n".join(lines + summary(meta, rows, checked))


def doc_section(meta: dict, rows: list, checked: dict) -> str:
    """The generated part of ``docs/benchmark.md``: header, compact table, footnotes,
    summary."""
    compact, notes = compact_table(rows)
    lines = [header(meta), ""] + quick_note(meta) + [f"`{meta['command']}`", "", compact, ""]
    lines += notes + ([""] if notes else []) + summary(meta, rows, checked)
    return "\n".join(lines)
