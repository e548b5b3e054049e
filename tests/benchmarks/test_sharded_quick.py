"""The sharded benchmark runs in quick mode: both strategies measured, and the collectives the attribution issues.

No timing is asserted. What is asserted is the callback's contract under each strategy: no collective at all
under DDP (the gradients are already averaged), and under ModelParallel (FSDP2) exactly one ``all_reduce`` per
flush, on fewer hook calls than there are steps (the shard sums wait on the device between flushes).
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.ddp
def test_sharded_quick_counts_one_all_reduce_per_flush(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sharded.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for line in result.stdout.splitlines()
        if line.startswith("| DDP") or line.startswith("| ModelParallel")
        for cells in [line.split("|")]
    }
    assert set(rows) == {"DDP", "ModelParallel (FSDP2)"}
    hook, step, share, per_flush, flushes, per_step, flush_time = rows["ModelParallel (FSDP2)"]
    assert hook.endswith(" us") and step.endswith(" ms") and share.endswith("%") and flush_time.endswith(" us")
    assert 0 < float(per_step) < 1
    assert [kind.split(" + ").count("all_reduce") for kind in per_flush.split("; ")] == [1]
    assert 0 < int(flushes) < 8  # --quick fits 8 steps
    assert rows["DDP"][3:5] == ["none", "0"] and rows["DDP"][6] == "-"
