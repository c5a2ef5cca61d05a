"""The examples run end to end (short settings, offline data, run in a temporary folder):
each says which data it used and its wall time, and the plotting ones write their plot (the
CG-Newton one under a name per curvature, so runs of several curvatures keep every plot).

The README's main example runs as a script in a fresh interpreter, as the README says; the
others run in this process (``runpy``, as ``__main__``), which spares an interpreter start and
the imports of torch, scikit-learn and matplotlib for each of them.
"""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).parents[1] / "examples"
RUNS = {
    "quickstart.py": ["--batch-size", "8", "--code-lines", "4"],
    "all_quantities.py": ["--batch-size", "16"],
    "diag_ggn_optimizer.py": ["--max-iter", "3", "--batch-size", "16"],
    "hbp_cg_newton.py": ["--epochs", "1", "--batch-size", "300", "--cg-maxiter", "3",
                         "--curvature", "hessian"],
}
PLOTS = {"diag_ggn_optimizer.py": "diag_ggn_optimizer.png",
         "hbp_cg_newton.py": "hbp_cg_newton_hessian.png"}
AS_SCRIPT = {"diag_ggn_optimizer.py"}  # the README's set-up command


def run_script(argv: list, cwd: Path) -> str:
    """``python examples/<script> ...`` in a fresh interpreter; its standard output."""
    env = {**os.environ, "FXCURV_NO_DOWNLOAD": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def run_here(argv: list, monkeypatch, capsys) -> str:
    """The same, in this process: ``sys.argv``, the examples folder on ``sys.path`` (as a
    script has its own folder), the environment and torch's generator set and restored."""
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("FXCURV_NO_DOWNLOAD", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    state = torch.get_rng_state()
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        torch.set_rng_state(state)
    return capsys.readouterr().out


@pytest.mark.parametrize("script", list(RUNS))
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    argv = [str(EXAMPLES / script), "--data-dir", str(tmp_path / "data"), *RUNS[script]]
    if script in AS_SCRIPT:
        out = run_script(argv, tmp_path)
    else:
        out = run_here(argv, monkeypatch, capsys)
    assert "Data: scikit-learn" in out    # says which data it used
    assert "Time: " in out                # and how long it took
    if script in PLOTS:
        assert (tmp_path / PLOTS[script]).stat().st_size > 0


def test_quickstart_on_cuda(tmp_path, monkeypatch, capsys, cuda_device):
    """The quickstart on CUDA: the step runs there and its gradient equals autograd's."""
    monkeypatch.chdir(tmp_path)
    argv = [str(EXAMPLES / "quickstart.py"), "--data-dir", str(tmp_path / "data"),
            *RUNS["quickstart.py"], "--device", str(cuda_device)]
    pytest.importorskip("sklearn")
    out = run_here(argv, monkeypatch, capsys)
    assert "on cuda" in out and "Time: " in out
    worst = re.search(r"max \|grad - autograd grad\| = ([0-9.e+-]+)\. ", out)
    assert worst is not None and float(worst.group(1)) < 1e-4, out
