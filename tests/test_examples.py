"""The scripts in examples/ run as a user runs them (small budgets); CI runs them in the slow
step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--budget", "2", "--storage", "runs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_own_model_example_compresses_and_evaluates_the_knee(tmp_path):
    out = run_example("own_model.py", tmp_path)
    dense = float(re.search(r"dense model: \d+ params, test accuracy ([\d.]+)", out).group(1))
    compact = re.search(r"compact model: (\d+) params .*test accuracy ([\d.]+)", out)
    assert dense > 0.9
    assert int(compact.group(1)) < int(re.search(r"dense model: (\d+)", out).group(1))
    assert float(compact.group(2)) > 0.8


@pytest.mark.slow
def test_regression_example_ranks_by_mean_squared_error(tmp_path):
    out = run_example("regression.py", tmp_path)
    assert "val_mse" in out
    knee = re.search(r"knee: trial \d+, (\d+) params .*val MSE ([\d.]+), test MSE ([\d.]+)", out)
    assert knee is not None, out
    assert float(knee.group(3)) < 1.0  # the targets are standardised: 1.0 is the mean guess
