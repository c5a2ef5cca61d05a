"""Data-parallel steps (``fxcurv.compile(..., process_group=...)``) against one process.

Both world sizes (2 and 3) start once, together: their ranks are forked from the test
process (they inherit its imports) and join a gloo group on 127.0.0.1. Every rank runs all
checks below on its shard of one global batch (unequal shard sizes, one rank with a single
sample) and writes a report; the tests read the reports. A deterministic quantity must equal
the single-process result on the concatenated batch (float64, rtol 1e-10).
"""
from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.nn as nn

SHARDS = {2: [5, 3], 3: [4, 1, 6]}      # samples per rank: unequal on purpose
DETERMINISTIC = ["batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
                 "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr", "kfra", "diag_h",
                 "diag_h_batch", "ggnmp", "hmp", "pchmp_abs", "pchmp_clip"]
CASES = {  # loss setting -> (loss, output shape per sample, quantities)
    "ce_mean": (nn.CrossEntropyLoss(), (3,), DETERMINISTIC),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), (3,), DETERMINISTIC),
    "mse_mean": (nn.MSELoss(), (3,), DETERMINISTIC),
    "bce_mean": (nn.BCEWithLogitsLoss(), (1,), ["batch_grad", "variance", "diag_ggn_exact",
                                                "kflr", "diag_h"]),
    "ce_positions": (nn.CrossEntropyLoss(), (3, 4), ["batch_grad", "variance", "kflr",
                                                     "sqrt_ggn_exact", "diag_h"]),
    "ce_ignore": (nn.CrossEntropyLoss(ignore_index=0), (3,), ["batch_grad", "variance",
                                                             "diag_ggn_exact", "kflr"]),
}
RTOL, ATOL = 1e-10, 1e-13
CHECKS = [f"{case}/{q}" for case, (_, _, qs) in CASES.items() for q in ["loss", "grad", *qs]] + [
    "ce_ignore/diag_h with ignored targets", "torchscript", "torchscript save/load",
    "torch.export", "torch.export refuses gathers",
    "ddp module", "ddp hooks untouched", "mc: diag_ggn_mc mean -> exact",
    "mc: kfac G mean -> kflr G", "mc: samples differ across ranks",
    "mc: equal generators refused", "batchnorm train: sum of the ranks' GGNs",
    "error: callable loss", "error: regulariser",
    "error: not a process group",
    "same result on every rank"]


# -- the ranks ------------------------------------------------------------------------------
def model_for(case: str) -> nn.Module:
    torch.manual_seed(0)
    if case == "ce_positions":  # [N, 2, 6] -> [N, 3, 4]: Kronecker factors of a conv
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Conv1d(4, 3, 1))
    out = CASES[case][1][0]
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


def global_batch(case: str, total: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(total, *((2, 6) if case == "ce_positions" else (4,)), generator=gen)
    if case.startswith("ce"):
        shape = (total, 4) if case == "ce_positions" else (total,)
        y = torch.randint(0, 3, shape, generator=gen)
    elif case.startswith("bce"):
        y = torch.rand(total, 1, generator=gen)
    else:
        y = torch.randn(total, 3, generator=gen)
    return x, y


def vectors_for(model: nn.Module) -> dict:
    gen = torch.Generator().manual_seed(2)
    return {n: torch.randn(2, *p.shape, generator=gen) for n, p in model.named_parameters()}


def shard(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def close(a, b) -> tuple[bool, str]:
    """Recursive comparison of step outputs; the largest relative error as detail."""
    ok, worst = True, 0.0
    for u, v in _pairs(a, b):
        if u.shape != v.shape:
            return False, f"shape {list(u.shape)} != {list(v.shape)}"
        ok = ok and torch.allclose(u, v, rtol=RTOL, atol=ATOL)
        if u.numel():
            worst = max(worst, ((u - v).abs() / (v.abs() + ATOL / RTOL)).max().item())
    return ok, f"max rel err {worst:.1e}"


def _pairs(a, b) -> list:
    if isinstance(b, dict):
        assert a.keys() == b.keys(), f"keys {list(a)} != {list(b)}"
        return [pair for k in b for pair in _pairs(a[k], b[k])]
    if isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{len(a)} != {len(b)} entries"
        return [pair for u, v in zip(a, b) for pair in _pairs(u, v)]
    return [(a, b)]


class Report:
    def __init__(self):
        self.results: dict[str, list] = {}

    def check(self, name: str, fn):
        try:
            ok, detail = fn()
        except Exception:  # noqa: BLE001 - reported to the parent test
            ok, detail = False, traceback.format_exc(limit=6)
        self.results[name] = [bool(ok), detail]


def check_case(report: Report, case: str, sizes: list, rank: int, group) -> None:
    import fxcurv
    loss_fn, _, quantities = CASES[case]
    model = model_for(case)
    x, y = global_batch(case, sum(sizes))
    products = [q for q in quantities if q in ("ggnmp", "hmp", "pchmp_abs", "pchmp_clip")]
    args = (vectors_for(model),) if products else ()
    reference = fxcurv.compile(model, loss_fn, quantities)(x, y, *args)
    step = fxcurv.compile(model, loss_fn, quantities, process_group=group)
    local = (shard(x, sizes, rank), shard(y, sizes, rank))
    if case == "ce_ignore":  # the Hessian factor and the gradient share one divisor
        with_h = fxcurv.compile(model, loss_fn, ["diag_h"], process_group=group)
        expected = fxcurv.compile(model, loss_fn, ["diag_h"])(x, y)
        report.check(f"{case}/diag_h with ignored targets",
                     lambda: close(with_h(*local), expected))
    result = step(*local, *args)
    for name, got, want in zip(["loss", "grad", *quantities], result, reference):
        report.check(f"{case}/{name}", lambda: close(got, want))
    if case == "ce_mean":
        report.check("same result on every rank", lambda: _same_everywhere(result, group))
        check_torchscript(report, step, local + args, result)
        check_export(report, model, loss_fn, local, group)


def check_torchscript(report: Report, step, args: tuple, expected) -> None:
    """The scripted step runs the same collectives; saved and loaded it still does."""
    scripted = torch.jit.script(step)
    report.check("torchscript", lambda: close(scripted(*args), expected))
    path = os.path.join(OUT["dir"], f"step{torch.distributed.get_rank()}.pt")
    scripted.save(path)
    report.check("torchscript save/load", lambda: close(torch.jit.load(path)(*args), expected))


def check_export(report: Report, model, loss_fn, args: tuple, group) -> None:
    """torch.export: a step without per-sample quantities exports with its collectives and a
    dynamic batch size (exported from two samples, run on this rank's shard); one that
    gathers them is refused with a clear error."""
    import fxcurv
    step = fxcurv.compile(model, loss_fn, ["variance", "kflr", "diag_h"], process_group=group)
    expected = step(*args)
    n = torch.export.Dim("N", min=1)
    example = global_batch("ce_mean", 2)
    report.check("torch.export", lambda: close(torch.export.export(
        step, example, dynamic_shapes={"x": {0: n}, "y": {0: n}}).module()(*args), expected))
    gathers = fxcurv.compile(model, loss_fn, ["batch_grad"], process_group=group)
    report.check("torch.export refuses gathers", lambda: _export_raises(gathers, args))


def _export_raises(step, args):
    try:
        torch.export.export(step, args)
    except RuntimeError as err:
        return "cannot export a data-parallel step" in str(err), str(err)[:80]
    return False, "no error"


def _same_everywhere(result, group):
    """Every rank returns bitwise the same global results."""
    import torch.distributed as dist
    flat = torch.cat([t.flatten() for t in _tensors(result)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(g, flat) for g in gathered), f"{flat.numel()} numbers"


def _tensors(value):
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value]


def check_ddp(report: Report, sizes: list, rank: int) -> None:
    """Compile the module inside DDP with DDP's group; DDP's gradient hooks never fire."""
    import fxcurv
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model_for("ce_mean"))
    loss_fn = nn.CrossEntropyLoss()
    x, y = global_batch("ce_mean", sum(sizes))
    reference = fxcurv.compile(ddp.module, loss_fn, ["kflr"])(x, y)
    step = fxcurv.compile(ddp.module, loss_fn, ["kflr"], process_group=ddp.process_group)
    result = step(shard(x, sizes, rank), shard(y, sizes, rank))
    report.check("ddp module", lambda: close(result, reference))
    untouched = all(p.grad is None for p in ddp.parameters())
    report.check("ddp hooks untouched", lambda: (untouched, "p.grad stays None"))


def check_monte_carlo(report: Report, sizes: list, rank: int, group) -> None:
    import fxcurv
    from fxcurv.errors import CompileError
    model, loss_fn = model_for("ce_mean"), nn.CrossEntropyLoss()
    x, y = global_batch("ce_mean", sum(sizes))
    local = (shard(x, sizes, rank), shard(y, sizes, rank))
    torch.manual_seed(5)  # the same generator on every rank: refused
    report.check("mc: equal generators refused", lambda: _compile_raises(
        CompileError, "same cpu generator", model, loss_fn, ["diag_ggn_mc"], group))
    torch.manual_seed(100 + rank)
    exact = fxcurv.compile(model, loss_fn, ["diag_ggn_exact", "kflr"])(x, y)
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_mc", "kfac"], mc_samples=40,
                          process_group=group)
    calls = 50
    runs = [step(*local) for _ in range(calls)]
    report.check("mc: diag_ggn_mc mean -> exact", lambda: _converges(
        [r[2] for r in runs], exact[2], calls * 40))
    report.check("mc: kfac G mean -> kflr G", lambda: _converges(
        [{n: f[0] for n, f in r[3].items()} for r in runs],
        {n: f[0] for n, f in exact[3].items()}, calls * 40))
    same = fxcurv.compile(model, loss_fn, ["sqrt_ggn_mc"], process_group=group)
    factor = same(x[:3], y[:3])[2]  # the same data on every rank
    report.check("mc: samples differ across ranks", lambda: _rank_blocks_differ(factor, 3))


def check_coupled(report: Report, sizes: list, rank: int, group) -> None:
    """BatchNorm in train mode normalises each rank's shard with its own statistics (DDP
    without SyncBatchNorm): with a summed loss the step's GGN quantities are the sum of the
    single-process ones on each shard (shards of at least two samples: twice SHARDS)."""
    import fxcurv
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    loss_fn, quantities = nn.CrossEntropyLoss(reduction="sum"), ["diag_ggn_exact", "ggnmp"]
    sizes = [2 * size for size in sizes]
    x, y = global_batch("ce_sum", sum(sizes))
    vectors = vectors_for(model)
    single = fxcurv.compile(model, loss_fn, quantities)
    parts = [single(shard(x, sizes, r), shard(y, sizes, r), vectors) for r in range(len(sizes))]
    expected = [{name: sum(part[i][name] for part in parts) for name in parts[0][i]}
                for i in (2, 3)]
    step = fxcurv.compile(model, loss_fn, quantities, process_group=group)
    result = step(shard(x, sizes, rank), shard(y, sizes, rank), vectors)
    report.check("batchnorm train: sum of the ranks' GGNs",
                 lambda: close(list(result[2:]), expected))


def _compile_raises(error, text, *args):
    import fxcurv
    try:
        fxcurv.compile(*args[:3], process_group=args[3])
    except error as err:
        return text in str(err), str(err)[:80]
    return False, "no error"


def _converges(samples: list, exact: dict, draws: int):
    """The mean of the MC estimates is within a few standard errors of the exact value."""
    worst = 0.0
    for name, want in exact.items():
        stack = torch.stack([s[name] for s in samples])
        error = (stack.mean(0) - want).norm() / want.norm()
        worst = max(worst, error.item())
    return worst < 6 / math.sqrt(draws) + 0.02, f"relative error {worst:.3f}"


def _rank_blocks_differ(factor: dict, n: int):
    blocks = [f.split(n, dim=1) for f in factor.values()]
    differ = all(not torch.allclose(b[0], b[r]) for b in blocks for r in range(1, len(b)))
    return differ, "rank blocks of the gathered MC factor"


def check_errors(report: Report, group) -> None:
    import fxcurv
    from fxcurv.errors import CompileError
    model = model_for("ce_mean")
    report.check("error: callable loss", lambda: _compile_raises(
        CompileError, "built-in loss", model, lambda f, y: 2 * nn.functional.cross_entropy(f, y),
        [], group))
    report.check("error: regulariser", lambda: _compile_raises(  # never summed over ranks
        CompileError, "built-in loss", model, lambda f, y: nn.functional.cross_entropy(f, y)
        + sum((p ** 2).sum() for p in model.parameters()), ["diag_ggn_exact"], group))
    report.check("error: not a process group", lambda: _compile_raises(
        CompileError, "ProcessGroup", model, nn.CrossEntropyLoss(), [], [0, 1]))


OUT = {"dir": "."}  # where a rank writes its report and files


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    OUT["dir"] = out
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    group, sizes, report = dist.group.WORLD, SHARDS[world], Report()
    sections = [(c, lambda c=c: check_case(report, c, sizes, rank, group)) for c in CASES]
    sections += [("ddp", lambda: check_ddp(report, sizes, rank)),
                 ("mc", lambda: check_monte_carlo(report, sizes, rank, group)),
                 ("coupled", lambda: check_coupled(report, sizes, rank, group)),
                 ("errors", lambda: check_errors(report, group))]
    for name, run in sections:
        started = time.perf_counter()
        run()
        report.results[f"seconds: {name}"] = [True, f"{time.perf_counter() - started:.2f}"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report.results, f)
    dist.barrier()
    dist.destroy_process_group()


# -- the tests ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_process(rank: int, world: int, port: int, out: str) -> None:
    """A forked rank: it shares the parent's imports (torch, fxcurv), so it starts at once."""
    torch.set_num_threads(1)
    try:
        worker(rank, world, port, out)
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _warm_up() -> None:
    """Import what every rank needs once, here: forked ranks inherit it."""
    import fxcurv
    fxcurv.compile(model_for("ce_mean"), nn.CrossEntropyLoss())  # the first compile imports


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Every rank of both world sizes at once, forked from this process: world size -> one
    report per rank."""
    _warm_up()
    context = multiprocessing.get_context("fork")
    runs = {}
    for world in SHARDS:
        out, port = str(tmp_path_factory.mktemp(f"world{world}")), _free_port()
        runs[world] = out, [context.Process(target=_rank_process, args=(rank, world, port, out))
                            for rank in range(world)]
        for process in runs[world][1]:
            process.start()
    results = {}
    for world, (out, processes) in runs.items():
        for rank, process in enumerate(processes):
            process.join(timeout=300)
            if process.is_alive():
                process.kill()
            error = os.path.join(out, f"rank{rank}.error")
            detail = open(error).read()[-3000:] if os.path.exists(error) else "no report"
            assert process.exitcode == 0, f"rank {rank} of {world} failed:\n{detail}"
        results[world] = [json.load(open(os.path.join(out, f"rank{r}.json")))
                          for r in range(world)]
    return results


@pytest.mark.parametrize("world", sorted(SHARDS))
@pytest.mark.parametrize("check", CHECKS)
def test_distributed(reports, world, check):
    for rank, result in enumerate(reports[world]):
        assert check in result, f"rank {rank} of {world} did not run {check!r}"
        ok, detail = result[check]
        assert ok, f"rank {rank} of {world}: {check}: {detail}"


def _example_rank(rank: int, port: int, out: str) -> None:
    """One rank of ``examples/distributed_kfac.py``, with the environment torchrun sets."""
    import contextlib
    import runpy
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "examples")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FXCURV_NO_DOWNLOAD="1")
    sys.path.insert(0, examples)
    sys.argv = ["distributed_kfac.py", "--data-dir", os.path.join(out, "data"), "--max-iter",
                "3", "--batch-size", "33", "--print-every", "1", "--show-code"]
    torch.set_num_threads(1)
    with open(os.path.join(out, f"example{rank}.txt"), "w") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        runpy.run_path(os.path.join(examples, "distributed_kfac.py"), run_name="__main__")


def test_example_distributed_kfac(tmp_path):
    """The example trains on 2 ranks with unequal shards (33 = 17 + 16) and stays in sync."""
    pytest.importorskip("sklearn.datasets")
    _warm_up()
    context, port = multiprocessing.get_context("fork"), _free_port()
    ranks = [context.Process(target=_example_rank, args=(r, port, str(tmp_path)))
             for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    output = (tmp_path / "example0.txt").read_text()
    assert all(p.exitcode == 0 for p in ranks), output[-3000:]
    assert "all_reduce_coalesced" in output                 # --show-code: the collectives
    assert "parameters identical on all 2 ranks: True" in output, output[-3000:]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:  # one rank by hand, for debugging
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
