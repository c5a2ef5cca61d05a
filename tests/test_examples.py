"""The examples run end to end (short settings, offline data, run in a temporary folder):
each says which data it used and its wall time, and the plotting ones write their plot (the
CG-Newton one under a name per curvature, so runs of several curvatures keep every plot)."""
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
    "hbp_cg_newton.py": ["--epochs", "1", "--batch-size", "300", "--cg-maxiter", "3",
                         "--curvature", "hessian"],
}
PLOTS = {"diag_ggn_optimizer.py": "diag_ggn_optimizer.png",
         "hbp_cg_newton.py": "hbp_cg_newton_hessian.png"}


@pytest.mark.parametrize("script", list(RUNS))
def test_example_runs(script, tmp_path):
    pytest.importorskip("sklearn")
    args = list(RUNS[script])
    env = {**os.environ, "FXCURV_NO_DOWNLOAD": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--data-dir",
                             str(tmp_path / "data"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Data: scikit-learn" in result.stdout    # says which data it used
    assert "Time: " in result.stdout                # and how long it took
    if script in PLOTS:
        assert (tmp_path / PLOTS[script]).stat().st_size > 0
