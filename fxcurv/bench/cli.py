"""The command line: options, a check that fxcurv can run at all, the run, the report, the
exit status (non-zero, with the reason, when fxcurv could not run)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import report as rep
from .contenders import all_quantities, first_line
from .driver import Options, run
from .memory import default_memory_limit_gib
from .workloads import WORKLOADS, default_workloads

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# the GPU section of the same document (a run with --device cuda writes there)
CUDA_BEGIN, CUDA_END = "<!-- bench-cuda:begin -->", "<!-- bench-cuda:end -->"
QUICK_WORKLOADS = ("seed_cnn", "mlp_sigmoid")
QUICK_QUANTITIES = ("grad", "batch_l2", "diag_ggn_exact", "diag_h")
DESCRIPTION = "fxcurv's compiled step against BackPACK and plain autograd."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fxcurv.bench", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workloads", default=None, help="comma-separated, of: "
                   f"{', '.join(WORKLOADS)} (default: those run on the device)")
    p.add_argument("--quantities", default=None, help="comma-separated quantity names "
                   "(grad: gradient only), or 'all' (default: each workload's own list)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per contender, "
                   "the first call included (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per contender "
                   "(default 7, --quick 3)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per "
                   "cell; slow cells get fewer repeats, at least 3 unless one round alone "
                   "takes longer (default 6, --quick 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override every workload's batch size (--quick: 8)")
    p.add_argument("--vectors", type=int, default=1, help="vectors for the product quantities")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--max-memory-gib", type=float, default=None,
                   help="kill a memory run above this resident set (default: half the "
                   "available memory, at most 16)")
    p.add_argument("--child-timeout", type=float, default=300.0,
                   help="seconds a memory run may take")
    p.add_argument("--inductor", action="store_true", help="add the contender "
                   "fxcurv+inductor (the step through torch.compile; its compilation is "
                   "part of the first call, not timed)")
    p.add_argument("--quick", action="store_true", help="smoke test: workloads "
                   f"{', '.join(QUICK_WORKLOADS)}, quantities {', '.join(QUICK_QUANTITIES)}, "
                   "batch 8, 3 repeats, 1 s per cell")
    p.add_argument("--json", metavar="PATH", help="write meta data, rows and targets as JSON")
    p.add_argument("--tablefmt", default="github", help="github or plain (others need "
                   "tabulate)")
    p.add_argument("--update-doc", metavar="PATH", nargs="?", const="docs/benchmark.md",
                   help=f"replace what lies between {BEGIN} and {END} in PATH with this "
                   "run's compact table")
    p.add_argument("--update-readme", metavar="PATH", nargs="?", const="README.md",
                   help="as --update-doc, for a README with the same markers")
    return p.parse_args(argv)


def _names(text: Optional[str], valid: list, what: str) -> list:
    names = valid if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def options(args: argparse.Namespace) -> Options:
    quick = args.quick

    def pick(value, default, quick_value):
        return value if value is not None else (quick_value if quick else default)

    workloads = pick(args.workloads, ",".join(default_workloads(args.device)),
                     ",".join(QUICK_WORKLOADS))
    quantities = pick(args.quantities, None, ",".join(QUICK_QUANTITIES))
    return Options(
        workloads=_names(workloads, list(WORKLOADS), "workloads"),
        quantities=None if quantities is None else _names(quantities, all_quantities(),
                                                          "quantities"),
        device=args.device, threads=args.threads, warmup=pick(args.warmup, 1, 1),
        repeats=pick(args.repeats, 7, 3), budget_s=pick(args.budget, 6.0, 1.0),
        batch_size=pick(args.batch_size, None, 8), vectors=args.vectors,
        memory=not args.no_memory,
        max_memory_gib=args.max_memory_gib or default_memory_limit_gib(),
        child_timeout_s=args.child_timeout, inductor=args.inductor, quick=quick)


def preflight() -> Optional[str]:
    """Why fxcurv cannot run here, or None: the imported ``fxcurv`` must be the package (not
    a folder of the same name in the current directory) and compile a tiny model."""
    import fxcurv
    if not hasattr(fxcurv, "compile"):
        where = ", ".join(getattr(fxcurv, "__path__", [])) or "?"
        return (f"`import fxcurv` found {where}, not the fxcurv package (a folder named "
                "fxcurv in the current directory shadows it?); run from another directory")
    try:
        model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
        fxcurv.compile(model, loss_fn)(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    except Exception as exc:  # noqa: BLE001 - the reason is the message
        return f"fxcurv fails on a one-layer model: {first_line(exc)}"
    return None


def failure(rows: list) -> Optional[str]:
    """Why the run measured nothing of fxcurv, or None."""
    mine = [row for row in rows if row["contender"] == "fxcurv"]
    if mine and all(row["median_ms"] is None for row in mine):
        errors = list(dict.fromkeys(row["error"] for row in mine if row["error"]))
        return f"every fxcurv cell failed ({len(mine)}); first error: {errors[0]}" \
            if errors else "no fxcurv cell was timed"
    return None


def update_doc(path: str, text: str, cuda: bool = False) -> None:
    """Replace what lies between the bench markers of ``path`` (the CUDA ones for a run on
    CUDA) with ``text``."""
    begin_mark, end_mark = (CUDA_BEGIN, CUDA_END) if cuda else (BEGIN, END)
    doc = Path(path).read_text()
    begin, end = doc.find(begin_mark), doc.find(end_mark)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no {begin_mark} ... {end_mark} section")
    Path(path).write_text(doc[:begin + len(begin_mark)] + "\n" + text + "\n" + doc[end:])


def _meta(opts: Options, argv, started: float, load: Optional[float]) -> dict:
    return rep.machine(opts.device) | {
        "threads": opts.threads, "warmup": opts.warmup, "repeats": opts.repeats,
        "budget_s": opts.budget_s, "vectors": opts.vectors, "memory": opts.memory,
        "quick": opts.quick, "batch_sizes": {w: opts.batch_of(w) for w in opts.workloads},
        "workloads": {w: WORKLOADS[w].doc for w in opts.workloads},
        "command": " ".join(["python -m fxcurv.bench"]
                            + list(sys.argv[1:] if argv is None else argv)),
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_1min": {"start": load, "end": rep.loadavg()}}


def main(argv=None) -> int:
    """Run the benchmark and print the report. Exit status 2 when fxcurv cannot run at
    all, 1 when every fxcurv cell failed, else 0; the reason goes to stderr."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    reason = preflight()
    if reason:
        print(f"fxcurv could not run: {reason}", file=sys.stderr)
        return 2
    opts = options(args)
    started, load = time.monotonic(), rep.loadavg()

    def save(rows: list, meta: Optional[dict] = None, checked: Optional[dict] = None) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"meta": meta, "rows": rows, "targets": checked}, indent=1))

    rows = run(opts, save)
    meta, checked = _meta(opts, argv, started, load), rep.targets(rows)
    print(rep.report(meta, rows, checked, args.tablefmt))
    save(rows, meta, checked)
    for path in filter(None, (args.update_doc, args.update_readme)):
        update_doc(path, rep.doc_section(meta, rows, checked), opts.device.startswith("cuda"))
    reason = failure(rows)
    if reason:
        print(f"fxcurv could not run: {reason}", file=sys.stderr)
        return 1
    return 0
