"""The overhead and scale benchmarks run in quick mode and print complete tables (no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_overhead_quick_measures_every_configuration(tmp_path):
    out = run("overhead.py", tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| demo CNN") or line.startswith("| wide MLP")]
    configs = {row.split("|")[2].strip() for row in rows}
    assert configs == {
        "bare",
        "BetaMomentumCallback",
        "DampingRegimeMonitor",
        "LayerAttributionCallback",
        "all three",
        "LearningRateMonitor(log_momentum=True)",
        "grad_norm recipe",
    }
    assert len(rows) == 14
    for row in rows:
        if row.split("|")[2].strip() == "bare":
            assert "| 1.000 |" in row  # a ratio to itself
    assert len(re.findall(r"the recipe's overhead is", out)) == 2
    assert not (tmp_path / "benchmarks").exists()  # nothing written without --write


@pytest.mark.slow
def test_scale_quick_reports_fits(tmp_path):
    out = run("scale.py", tmp_path)
    assert "### Parameter tensors (5 groups)" in out and "### Layer groups (200 tensors)" in out
    tensors = [int(m) for m in re.findall(r"^\| (\d+) \| \d+ \| \d+ \| \d+ \|$", out, re.M)]
    assert tensors[:2] == [10, 100] and tensors[2:] == [1, 10]
    assert re.search(r"log-log slope -?\d+\.\d\d", out)
