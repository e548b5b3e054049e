"""Every example runs to completion, quickly, and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_01_beta_momentum():
    out = run_example("01_beta_momentum.py", "--epochs", "2")
    assert "critical momentum at lr=0.1: 0.368" in out
    for name in ("SGD, constant momentum 0.9", "SGD + BetaMomentumCallback", "AdamW + BetaMomentumCallback"):
        assert name in out
    # After a cosine decay to 0 the beta schedule sits at the upper clamp.
    assert "SGD + BetaMomentumCallback" in out and "final momentum=0.990" in out


@pytest.mark.slow
def test_02_damping_monitor(tmp_path):
    out = run_example("02_damping_monitor.py", "--epochs", "2", "--logdir", str(tmp_path / "logs"))
    # Constant momentum 0.9 at lr ~0.1 is underdamped; the beta schedule sits at zeta = 1.
    constant, beta = out.split("## beta_momentum")
    assert "| 0 | pg0 |" in constant and "underdamped | 100%" in constant
    assert "| 0 | pg0 | 1 | critical | 0% | 100% | 0% |" in beta
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "logs").rglob("*"))


@pytest.mark.slow
def test_03_layer_attribution(tmp_path):
    out = run_example("03_layer_attribution.py", "--epochs", "2", cwd=tmp_path)
    assert "ranking by size-normalised norm:" in out
    artifacts = list(tmp_path.rglob("attribution.json"))
    assert len(artifacts) == 1
    from lightning_beta.diagnosis import load_attribution

    artifact = load_attribution(artifacts[0])
    assert artifact.complete and len(artifact.history) == 2
    assert f"({artifact.total.count} optimizer steps)" in out


@pytest.mark.slow
def test_04_diagnose_and_repair():
    out = run_example("04_diagnose_and_repair.py")
    assert "with the planted fault" in out
    assert "flagged: ['layer2'" in out  # activation drift names the group the fault was planted in
    assert "## Treat and verify" in out
