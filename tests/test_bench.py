"""``python -m fxcurv.bench``: a quick smoke run (tiny batch, two quantities, memory runs
included) checking the JSON's structure and the table; no timing asserts."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from fxcurv import bench

pytest.importorskip("backpack")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

ROW_KEYS = {"workload", "quantity", "contender", "median_ms", "min_ms", "times_ms",
            "x_autograd", "x_backpack", "peak_mib", "error", "note"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run, shared by the checks below: MLP (batch 8), grad and batch_l2."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--workloads", "mlp", "--quantities", "grad,batch_l2",
                    "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text())


def test_json_structure(quick_run):
    meta, rows, targets = quick_run["meta"], quick_run["rows"], quick_run["targets"]
    for key in ("date", "cpu", "cores", "torch", "backpack", "threads", "device", "command",
                "batch_sizes", "repeats", "warmup"):
        assert key in meta, key
    assert meta["threads"] == 1 and meta["batch_sizes"] == {"mlp": 8}
    assert [(r["quantity"], r["contender"]) for r in rows] == [
        (q, c) for q in ("grad", "batch_l2") for c in ("fxcurv", "BackPACK", "autograd")]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["workload"] == "mlp" and row["error"] is None, row["error"]
        assert row["median_ms"] > 0 and len(row["times_ms"]) >= 3
        assert row["peak_mib"] is not None and row["peak_mib"] >= 0
        assert row["x_autograd"] > 0 and row["x_backpack"] > 0
        if row["contender"] == "autograd":
            assert row["x_autograd"] == 1.0
    assert set(targets) == {"fxcurv_over_backpack", "geomean_fxcurv_over_backpack",
                            "geomean_cells", "geomean_by_workload", "geomean_all_cells",
                            "geomean_target", "misses", "other_misses"}
    assert targets["geomean_cells"] == 2 and set(targets["geomean_by_workload"]) == {"mlp"}
    assert set(targets["fxcurv_over_backpack"]) == {"mlp/grad", "mlp/batch_l2"}


def test_table_renders(quick_run):
    text = bench.table(quick_run["rows"])
    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == bench.HEADERS
    assert len(lines) == 2 + len(quick_run["rows"])
    assert "fxcurv" in text and "BackPACK" in text and "autograd" in text


def test_errors_take_the_place_of_numbers():
    rows = [bench._row("transformer", "(all)", "fxcurv", error="CompileError: " + "x" * 200),
            bench._row("mlp", "kfra", "BackPACK", times=[2.0, 1.0, 3.0])]
    text = bench.table(bench._with_ratios(rows))
    assert "CompileError: xxx" in text and "..." in text
    assert "| 2.0 " in text  # the median
    assert bench.targets(rows)["misses"] == []


META = {"date": "2026-01-01", "cpu": "cpu", "cores": 2, "torch": "2", "backpack": "1",
        "opacus": None, "threads": 2, "device": "cpu", "seconds": 1.0, "command": "bench",
        "loadavg_1min": {"start": 0.1, "end": 0.1}}


def test_targets_hold_on_the_issues_workloads():
    """The geometric mean is over seed_cnn, mlp and 3c3d; a transformer miss is listed apart."""
    rows = []
    for workload, fx, bp in (("mlp", 1.0, 2.0), ("seed_cnn", 2.0, 4.0), ("transformer", 3.0, 1.0)):
        rows.append(bench._row(workload, "grad", "fxcurv", times=[fx] * 3))
        rows.append(bench._row(workload, "grad", "BackPACK", times=[bp] * 3))
    checked = bench.targets(bench._with_ratios(rows))
    assert checked["geomean_fxcurv_over_backpack"] == pytest.approx(0.5)
    assert checked["geomean_all_cells"] == pytest.approx((0.5 * 0.5 * 3.0) ** (1 / 3))
    assert checked["geomean_by_workload"]["transformer"] == pytest.approx(3.0)
    assert checked["misses"] == []
    assert checked["other_misses"] == ["transformer/grad: time fxcurv/BackPACK 3.00 > 1.0"]
    assert "over the 2 cells of seed_cnn, mlp, 3c3d" in bench.report(
        META, rows, checked, "github")


def test_batch_grad_slower_than_backpack_is_one_miss():
    rows = [bench._row("mlp", "batch_grad", name, times=[t] * 3)
            for name, t in (("fxcurv", 2.0), ("BackPACK", 1.0), ("vmap(grad)", 3.0))]
    assert bench.targets(bench._with_ratios(rows))["misses"] == [
        "mlp/batch_grad: time fxcurv/BackPACK 2.00 > 1.0"]


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit, match="unknown quantities: nope"):
        bench.options(bench.parse_args(["--quantities", "nope"]))
    opts = bench.options(bench.parse_args(["--quantities", "all"]))
    assert opts.quantities[:2] == ["grad", "batch_grad"] and "hmp" in opts.quantities


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_workload_shapes(name):
    setup = bench.prepare(name, "cpu", 2, 1)
    with torch.no_grad():
        assert setup.model(setup.x).shape == (2, 10)


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold\n{bench.README_END}\nrest\n")
    bench.update_readme(str(readme), "new table")
    assert readme.read_text() == (f"intro\n{bench.README_BEGIN}\nnew table\n"
                                  f"{bench.README_END}\nrest\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory runs read /proc")
def test_memory_limit_kills_the_run():
    runner = bench.MemoryRunner(limit_bytes=1, timeout_s=60)
    spec = dict(workload="mlp", quantity="grad", contender="autograd", device="cpu",
                threads=1, batch_size=8, vectors=1)
    assert "memory limit" in runner.measure(spec)["error"]


def test_inductor_contender_is_opt_in():
    assert not bench.options(bench.parse_args([])).inductor
    assert bench.options(bench.parse_args(["--inductor"])).inductor
    assert "fxcurv+inductor" not in bench.contenders_for("grad", False)
    assert bench.contenders_for("batch_l2", False, inductor=True)[:2] == [
        "fxcurv", "fxcurv+inductor"]
    assert bench.MAKERS["fxcurv+inductor"] is bench.make_fxcurv_inductor
