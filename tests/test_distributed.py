"""Data-parallel steps (``fxcurv.compile(..., process_group=...)``) against one process.

Each world size spawns its ranks once (``python tests/test_distributed.py --worker ...``,
gloo on 127.0.0.1); every rank runs all checks below on its shard of one global batch
(unequal shard sizes) and writes a report; the tests read the reports. A deterministic
quantity must equal the single-process result on the concatenated batch (float64).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.nn as nn

SHARDS = {2: [5, 3], 3: [4, 1, 6]}      # samples per rank: unequal on purpose
DETERMINISTIC = ["batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
                 "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr", "kfra", "diag_h",
                 "diag_h_batch", "ggnmp", "hmp"]
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
    "ce_ignore/diag_h refused at call time", "torchscript", "torchscript save/load",
    "ddp module", "ddp hooks untouched", "mc: diag_ggn_mc mean -> exact",
    "mc: kfac G mean -> kflr G", "mc: samples differ across ranks",
    "mc: equal generators refused", "error: callable loss", "error: not a process group",
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
    if isinstance(a, dict):
        results = [close(a[k], b[k]) for k in b] if a.keys() == b.keys() else [(False, "keys")]
    elif isinstance(a, (list, tuple)):
        results = [close(u, v) for u, v in zip(a, b)] if len(a) == len(b) else [(False, "len")]
    else:
        if a.shape != b.shape:
            return False, f"shape {list(a.shape)} != {list(b.shape)}"
        err = ((a - b).abs() / (b.abs() + ATOL / RTOL)).max().item() if a.numel() else 0.0
        return torch.allclose(a, b, rtol=RTOL, atol=ATOL), f"max rel err {err:.1e}"
    ok = all(r[0] for r in results)
    return ok, max((r[1] for r in results), key=lambda s: s) if results else ""


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
    products = [q for q in quantities if q in ("ggnmp", "hmp")]
    args = (vectors_for(model),) if products else ()
    reference = fxcurv.compile(model, loss_fn, quantities)(x, y, *args)
    step = fxcurv.compile(model, loss_fn, quantities, process_group=group)
    local = (shard(x, sizes, rank), shard(y, sizes, rank))
    if case == "ce_ignore":
        quantities = quantities + ["diag_h"]
        with_h = fxcurv.compile(model, loss_fn, quantities, process_group=group)
        report.check(f"{case}/diag_h refused at call time", lambda: _raises(with_h, *local))
        quantities = quantities[:-1]
    result = step(*local, *args)
    for name, got, want in zip(["loss", "grad", *quantities], result, reference):
        report.check(f"{case}/{name}", lambda: close(got, want))
    if case == "ce_mean":
        report.check("torchscript", lambda: close(torch.jit.script(step)(*local, *args), result))
        report.check("torchscript save/load", lambda: _save_load(step, local + args, result))
        report.check("same result on every rank", lambda: _same_everywhere(result, group))


def _raises(step, x, y):
    try:
        step(x, y)
    except ValueError as err:
        return "same count" in str(err), str(err)[:80]
    return False, "no error"


def _save_load(step, args, expected):
    path = os.path.join(os.environ["FXCURV_TEST_DIR"], f"step{torch.distributed.get_rank()}.pt")
    torch.jit.script(step).save(path)
    return close(torch.jit.load(path)(*args), expected)


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
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_mc", "kfac"], mc_samples=20,
                          process_group=group)
    calls = 100
    runs = [step(*local) for _ in range(calls)]
    report.check("mc: diag_ggn_mc mean -> exact", lambda: _converges(
        [r[2] for r in runs], exact[2], calls * 20))
    report.check("mc: kfac G mean -> kflr G", lambda: _converges(
        [{n: f[0] for n, f in r[3].items()} for r in runs],
        {n: f[0] for n, f in exact[3].items()}, calls * 20))
    same = fxcurv.compile(model, loss_fn, ["sqrt_ggn_mc"], process_group=group)
    factor = same(x[:3], y[:3])[2]  # the same data on every rank
    report.check("mc: samples differ across ranks", lambda: _rank_blocks_differ(factor, 3))


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
    report.check("error: not a process group", lambda: _compile_raises(
        CompileError, "ProcessGroup", model, nn.CrossEntropyLoss(), [], [0, 1]))


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    group, sizes, report = dist.group.WORLD, SHARDS[world], Report()
    started = time.perf_counter()
    for case in CASES:
        check_case(report, case, sizes, rank, group)
    check_ddp(report, sizes, rank)
    check_monte_carlo(report, sizes, rank, group)
    check_errors(report, group)
    report.results["seconds"] = [True, f"{time.perf_counter() - started:.1f}"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report.results, f)
    dist.barrier()
    dist.destroy_process_group()


# -- the tests ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=sorted(SHARDS))
def reports(request, tmp_path_factory):
    world = request.param
    out = str(tmp_path_factory.mktemp(f"world{world}"))
    env = dict(os.environ, FXCURV_TEST_DIR=out, OMP_NUM_THREADS="1")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world),
                               str(port), out], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for rank in range(world)]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} of {world} failed:\n{log[-3000:]}"
    return world, [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


@pytest.mark.parametrize("check", CHECKS)
def test_distributed(reports, check):
    world, results = reports
    for rank, result in enumerate(results):
        assert check in result, f"rank {rank} of {world} did not run {check!r}"
        ok, detail = result[check]
        assert ok, f"rank {rank} of {world}: {check}: {detail}"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
