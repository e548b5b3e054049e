"""The GPU proof script's dry run: every part runs on the CPU at tiny sizes (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
CONFIGS = {
    "bare",
    "BetaMomentumCallback",
    "DampingRegimeMonitor",
    "LayerAttributionCallback",
    "all three",
    "LearningRateMonitor(log_momentum=True)",
    "grad_norm recipe",
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str]:
    results = tmp_path_factory.mktemp("gpu") / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Overhead\n\nkept\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=results.parent,
    )
    return done, results.read_text()


@pytest.mark.slow
def test_dry_run_prints_the_ratio_table_for_every_model_and_configuration(dry_run):
    done, _ = dry_run
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| ResNet-18", "| GPT-2"))]
    by_model: dict[str, set[str]] = {}
    for row in rows:
        by_model.setdefault(row[1].strip(), set()).add(row[2].strip())
        assert float(row[4]) > 0  # the ratio to bare
    assert len(by_model) == 3, done.stdout[-3000:]
    assert all(configs == CONFIGS for configs in by_model.values()), by_model
    assert "grad_norm recipe" in done.stdout and "target >= 9x" in done.stdout


@pytest.mark.slow
def test_dry_run_checks_host_syncs_in_every_combination(dry_run):
    done, _ = dry_run
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("| 32-true", "| bf16", "| 16-"))]
    combos = {(r[1].strip(), r[2].strip(), r[3].strip()) for r in rows}
    assert len(combos) == 3 * 2 * 5
    assert all(int(r[5]) > 0 for r in rows)  # every fit reached at least one guarded step
    for bare in (r for r in rows if r[3].strip() == "bare" and r[6].strip() != "no host sync"):
        # a sync of torch's or Lightning's own: the callbacks of that combination are guarded inside their methods
        assert "lightning_beta" not in bare[6], bare[6]
        same = [r for r in rows if r[1:3] == bare[1:3] and r[3].strip() != "bare"]
        assert {r[4].strip() for r in same} == {"callbacks' own methods"}
    failing = [
        " | ".join(c.strip() for c in r[1:7]) for r in rows if r[3].strip() != "bare" and r[6].strip() != "no host sync"
    ]
    assert not failing, "host copies on non-logging steps:\n" + "\n".join(failing)


@pytest.mark.slow
def test_dry_run_exits_zero_and_writes_its_section(dry_run):
    done, text = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "## Overhead\n\nkept" in text  # other sections are kept
    section = text.split("## GPU (dry run on the CPU)", 1)[1]
    assert "Device: CPU only (dry run)" in section and "### Host syncs" in section and "### Overhead" in section
    assert "### Demo" in section and "exit code 0" in section.split("### Demo", 1)[1]
