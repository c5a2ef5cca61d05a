"""The examples run end to end (short settings, offline data, plots to a temporary folder)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
RUNS = {
    "quickstart.py": ["--batch-size", "8", "--code-lines", "4"],
    "all_quantities.py": ["--batch-size", "16"],
    "diag_ggn_optimizer.py": ["--max-iter", "3", "--batch-size", "16"],
    "hbp_cg_newton.py": ["--epochs", "1", "--batch-size", "300", "--cg-maxiter", "3"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_example_runs(script, tmp_path):
    pytest.importorskip("sklearn")
    args = list(RUNS[script])
    if script in ("diag_ggn_optimizer.py", "hbp_cg_newton.py"):
        args += ["--plot", str(tmp_path / "plot.png")]
    env = {**os.environ, "FXCURV_NO_DOWNLOAD": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--data-dir",
                             str(tmp_path / "data"), *args], cwd=EXAMPLES, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scikit-learn" in result.stdout          # says which data it used
    if "--plot" in args:
        assert (tmp_path / "plot.png").stat().st_size > 0
