"""``python -m fxcurv.bench``: a quick smoke run (tiny batch, two quantities, memory runs
included) checking the JSON's structure and the tables; the exit status when fxcurv cannot
run; the workloads. No timing asserts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxcurv import CompileError, bench
from fxcurv.bench import contenders, workloads

pytest.importorskip("backpack")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

ROW_KEYS = {"workload", "quantity", "contender", "median_ms", "min_ms", "times_ms",
            "x_autograd", "x_backpack", "peak_mib", "first_ms", "compile_s", "error", "note"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run, shared by the checks below: MLP (batch 8), grad and batch_l2."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        status = bench.main(["--quick", "--workloads", "mlp", "--quantities", "grad,batch_l2",
                             "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return json.loads(path.read_text())


def test_json_structure(quick_run):
    meta, rows, targets = quick_run["meta"], quick_run["rows"], quick_run["targets"]
    for key in ("date", "cpu", "cores", "torch", "backpack", "threads", "device", "command",
                "batch_sizes", "repeats", "warmup", "quick", "gpu"):
        assert key in meta, key
    assert meta["threads"] == 1 and meta["batch_sizes"] == {"mlp": 8} and meta["quick"]
    assert [(r["quantity"], r["contender"]) for r in rows] == [
        (q, c) for q in ("grad", "batch_l2") for c in ("fxcurv", "BackPACK", "autograd")]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["workload"] == "mlp" and row["error"] is None, row["error"]
        assert row["median_ms"] > 0 and len(row["times_ms"]) >= 3 and row["first_ms"] > 0
        assert row["peak_mib"] is not None and row["peak_mib"] >= 0
        assert row["x_autograd"] > 0 and row["x_backpack"] > 0
        assert (row["compile_s"] is not None) == (row["contender"] == "fxcurv")
        if row["contender"] == "autograd":
            assert row["x_autograd"] == 1.0
    assert targets["geomean_cells"] == 2 and set(targets["geomean_by_workload"]) == {"mlp"}
    assert set(targets["fxcurv_over_backpack"]) == {"mlp/grad", "mlp/batch_l2"}
    assert set(targets["fxcurv_over_autograd"]) == {"mlp/grad", "mlp/batch_l2"}


def test_tables_render(quick_run):
    text = bench.table(quick_run["rows"])
    lines = text.splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == bench.HEADERS
    assert len(lines) == 2 + len(quick_run["rows"])
    compact, notes = bench.compact_table(quick_run["rows"])
    assert len(compact.splitlines()) == 2 + 2  # one line per quantity
    assert notes == ["[1] BackPACK: the extended model without an extension"]
    meta = quick_run["meta"]
    assert "Quick smoke run" in bench.report(meta, quick_run["rows"], quick_run["targets"])
    assert "fxcurv's first call" in bench.doc_section(meta, quick_run["rows"],
                                                      quick_run["targets"])


def test_errors_become_footnotes():
    rows = [bench._row("mlp", "kfra", "fxcurv", times=[1.0] * 3, first_ms=5.0, compile_s=0.1),
            bench._row("mlp", "kfra", "BackPACK", error="NotImplementedError: no | rule"),
            bench._row("gpt", "kfac", "fxcurv", error="CompileError: " + "x" * 200),
            bench._row("gpt", "kfac", "BackPACK", error="NotImplementedError: no | rule")]
    rows = bench._with_ratios(rows)
    full = bench.table(rows)
    assert "CompileError: xxx" in full and "..." in full and "| 1.0 " in full
    compact, notes = bench.compact_table(rows)
    assert notes == ["[1] BackPACK: NotImplementedError: no | rule",
                     "[2] fxcurv: CompileError: " + "x" * 200]
    assert "–[1]" in compact and "–[2]" in compact and "| 0.11 " in compact  # 0.1 s + 5 ms
    assert "xxx" not in compact and "no \\| rule" not in compact
    assert bench.targets(rows)["misses"] == []
    slow = bench._with_ratios([bench._row("mlp", "diag_h", "fxcurv", times=[9e3])])
    assert bench.compact_table(slow)[1] == [
        "[1] 1 timed call only: one round of the cell took longer than --budget"]


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
    assert "over the 2 cells of seed_cnn, mlp, 3c3d" in bench.report(META, rows, checked)


def test_batch_grad_slower_than_backpack_is_one_miss():
    rows = [bench._row("mlp", "batch_grad", name, times=[t] * 3)
            for name, t in (("fxcurv", 2.0), ("BackPACK", 1.0), ("vmap(grad)", 3.0))]
    assert bench.targets(bench._with_ratios(rows))["misses"] == [
        "mlp/batch_grad: time fxcurv/BackPACK 2.00 > 1.0"]


def test_slow_cells_get_fewer_rounds():
    assert bench.timing.number_of_rounds(0.01, 7, 6.0) == 7
    assert bench.timing.number_of_rounds(2.5, 7, 6.0) == 3
    assert bench.timing.number_of_rounds(30.0, 7, 6.0) == 1


def test_options():
    with pytest.raises(SystemExit, match="unknown quantities: nope"):
        bench.options(bench.parse_args(["--quantities", "nope"]))
    opts = bench.options(bench.parse_args(["--quantities", "all"]))
    assert opts.quantities[:2] == ["grad", "batch_grad"] and "hmp" in opts.quantities
    opts = bench.options(bench.parse_args([]))
    assert "all_cnn_c" not in opts.workloads and "gpt2_block" in opts.workloads
    assert opts.quantities_of("mlp_sigmoid") == list(workloads.HESSIAN_QUANTITIES)
    assert "all_cnn_c" in bench.options(bench.parse_args(["--device", "cuda"])).workloads
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench.main(["--device", "cuda"])
    quick = bench.options(bench.parse_args(["--quick"]))
    assert quick.batch_size == 8 and quick.repeats == 3 and len(quick.workloads) <= 3


def test_every_workload_builds():
    """Each model gives ``[N, classes, *target]`` outputs; BackPACK's copy gives the same."""
    for name, spec in bench.WORKLOADS.items():
        setup = bench.prepare(name, "cpu", 2, 1)
        with torch.no_grad():
            out = setup.model(setup.x)
            assert out.shape == (2, spec.num_classes, *spec.target_shape), name
            assert setup.y.shape == (2, *spec.target_shape)
            assert torch.equal(workloads.for_backpack(setup.model)(setup.x), out)
            assert torch.isfinite(setup.loss_fn(out, setup.y))


def test_backpack_runs_the_lstm():
    """BackPACK's LSTM support through its own tuple and permute modules."""
    setup = bench.prepare("lstm", "cpu", 2, 1)
    _, values = bench.MAKERS["BackPACK"](setup, "diag_ggn_exact")()
    shapes = [p.shape for p in setup.model.parameters()]
    assert [v.shape for v in values] == shapes and all(v.ge(0).all() for v in values)


def test_update_doc(tmp_path):
    doc = tmp_path / "benchmark.md"
    doc.write_text(f"intro\n{bench.BEGIN}\nold\n{bench.END}\nrest\n")
    bench.update_doc(str(doc), "new table")
    assert doc.read_text() == f"intro\n{bench.BEGIN}\nnew table\n{bench.END}\nrest\n"


def test_update_doc_cuda_section(tmp_path):
    """A run on CUDA writes the GPU section and leaves the CPU one alone."""
    from fxcurv.bench.cli import CUDA_BEGIN, CUDA_END
    doc = tmp_path / "benchmark.md"
    doc.write_text(f"{bench.BEGIN}\ncpu\n{bench.END}\n{CUDA_BEGIN}\nold\n{CUDA_END}\n")
    bench.update_doc(str(doc), "gpu table", cuda=True)
    assert doc.read_text() == (f"{bench.BEGIN}\ncpu\n{bench.END}\n"
                               f"{CUDA_BEGIN}\ngpu table\n{CUDA_END}\n")


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


def test_exit_status_when_every_fxcurv_cell_fails(monkeypatch, capsys):
    def refuse(setup, quantity):
        raise CompileError("refused for the test")

    monkeypatch.setitem(contenders.MAKERS, "fxcurv", refuse)
    status = bench.main(["--quick", "--workloads", "mlp", "--quantities", "grad",
                         "--threads", "1", "--no-memory", "--repeats", "1"])
    err = capsys.readouterr().err
    assert status == 1
    assert "fxcurv could not run: every fxcurv cell failed (1)" in err
    assert "refused for the test" in err


def test_exit_status_when_a_folder_shadows_the_package(tmp_path):
    """Run from a directory holding a folder named ``fxcurv`` (a fresh clone's parent)."""
    (tmp_path / "fxcurv").mkdir()
    done = subprocess.run([sys.executable, "-m", "fxcurv.bench", "--quick", "--no-memory"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fxcurv could not run" in done.stderr and "shadows" in done.stderr


def test_docs_name_every_workload():
    from pathlib import Path
    doc = (Path(__file__).parents[1] / "docs" / "benchmark.md").read_text()
    assert bench.BEGIN in doc and bench.END in doc
    for name, spec in bench.WORKLOADS.items():
        assert f"| `{name}` | {spec.batch_size} |" in doc, name
