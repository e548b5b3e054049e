"""The convergence benchmark's quick mode runs, writes its section, and reports steps to target from its curves."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convergence.py"
STEPS_PER_EPOCH = 21  # 1348 training digits // batch 64 (last partial batch dropped)


def first_reach(steps: list[int], acc: list[float], target: float) -> int | None:
    return next((s for s, a in zip(steps, acc) if a >= target), None)


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_convergence_quick(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n## Convergence\n\nstale table\n\n## Localization\n\nsomeone else's section\n"
    )
    curves = tmp_path / "convergence.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(results), "--json", str(curves), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    text = results.read_text()
    # Our section replaced in place, the other developer's section kept.
    assert text.count("## Convergence") == 1 and "stale table" not in text
    assert "## Localization\n\nsomeone else's section" in text
    for needle in ("- Machine:", "- Versions:", "- Command: `python benchmarks/convergence.py --quick", "### resnet"):
        assert needle in text

    data = json.loads(curves.read_text())
    runs = data["runs"]
    assert {(r["method"], r["lr"]) for r in runs} == {
        ("constant 0.9", 0.1),
        ("beta (paper)", 0.1),
        ("constant 0.9", 0.03),
        ("beta (paper)", 0.03),
    }
    for run in runs:
        steps, acc = run["steps"], run["acc"]
        assert steps[0] == 0 and steps[-1] == 2 * STEPS_PER_EPOCH
        assert steps == sorted(set(steps)) and len(acc) == len(steps) == len(run["loss"])
        assert all(0.0 <= a <= 1.0 for a in acc)
        # Until the run first reaches 95%, every optimizer step is evaluated: steps to target are exact.
        reached_95 = first_reach(steps, acc, 0.95)
        dense = [s for s in steps if reached_95 is None or s <= reached_95]
        assert dense == list(range(len(dense)))

    main = table_rows(text, "| method |")
    assert [row[0] for row in main] == ["constant 0.9", "beta (paper)"]
    for row in main:
        run = next(r for r in runs if r["method"] == row[0] and r["lr"] == float(row[1]))
        for cell, target in ((row[2], 0.90), (row[3], 0.95)):
            expected = first_reach(run["steps"], run["acc"], target)
            assert cell == ("not reached (1/1)" if expected is None else str(expected))
        assert row[4] == f"{100 * run['acc'][-1]:.1f}"
        assert row[5] == f"{run['loss'][-1]:.3f}"
    assert main[0][6] == "(baseline)"
    assert re.fullmatch(r"\d+\.\d\dx|n/a.*", main[1][6])

    sweep = table_rows(text, "| peak lr |")
    assert [(row[0], row[1]) for row in sweep] == [
        ("0.03", "constant 0.9"),
        ("0.03", "beta (paper)"),
        ("0.1", "constant 0.9"),
        ("0.1", "beta (paper)"),
    ]
    assert "Retuned comparison: each method's best peak lr" in text
    assert "### Against the paper" in text
