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


@pytest.mark.slow
def test_05_lightning_cli_yaml(tmp_path):
    run_example(
        "05_lightning_cli.py",
        "fit",
        "--config",
        str(EXAMPLES / "05_lightning_cli.yaml"),
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "lightning_beta_runs" / "05_lightning_cli" / "version_0"
    assert (run_dir / "attribution.json").is_file()
    from tests.helpers import read_scalars

    scalars = read_scalars(run_dir)
    # The YAML's hybrid schedule: physics momentum until it reaches 0.9 from below, then 0.9.
    momenta = [value for _, value in scalars["beta/momentum"]]
    assert momenta[0] == pytest.approx(1 - 2 * 0.1**0.5, abs=1e-3) and momenta[-1] == pytest.approx(0.9)
    assert "damping/zeta" in scalars and "grad_norm/total" in scalars


def _write_cifar_batch(path: Path, n: int, seed: int) -> None:
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
    path.write_bytes(pickle.dumps(batch))


@pytest.mark.slow
def test_06_cifar10_loading_model_and_wiring(tmp_path):
    import importlib.util

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_cifar_batch(folder / f"data_batch_{i}", 4, i)
    _write_cifar_batch(folder / "test_batch", 6, 0)

    spec = importlib.util.spec_from_file_location("example06", EXAMPLES / "06_cifar10_resnet18.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    train, test = module.load_cifar10(tmp_path)
    assert train.tensors[0].shape == (20, 3, 32, 32) and test.tensors[0].shape == (6, 3, 32, 32)
    # Normalised with the CIFAR-10 channel statistics: pixel 0 maps to -mean/std.
    assert train.tensors[0].min() >= (-module.MEAN / module.STD).min() - 1e-6

    from lightning_beta.layer_groups import group_parameters

    net = module.ResNet18()
    assert list(group_parameters(net)) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # torchvision's resnet18, 3x3 stem, 10 classes

    with pytest.raises(FileNotFoundError, match="lacks"):
        module.load_cifar10(tmp_path / "empty")

    out = run_example(
        "06_cifar10_resnet18.py",
        "--data", str(tmp_path), "--fast-dev-run", "--batch-size", "4", "--accelerator", "cpu", "--devices", "1",
        "--out", str(tmp_path / "runs"),
        cwd=tmp_path,
    )  # fmt: skip
    assert "done: tensorboard --logdir" in out


@pytest.mark.slow
def test_07_transformer_lm(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("07_transformer_lm.py", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    groups = ["model.transformer.wte", "model.transformer.wpe", "model.transformer.h.0", "model.transformer.h.1"]
    groups.append("model.transformer.ln_f")
    assert f"layer groups: {groups}" in out
    assert "tied: model.transformer.wte.weight (group model.transformer.wte) is also model.lm_head.weight" in out
    before, after = (float(v) for v in out.split("token accuracy ")[1].split()[0:3:2])
    assert before < 0.1 and after > 0.6  # the toy grammar is learnt in 64 steps
    from lightning_beta.diagnosis import load_attribution

    (path,) = (tmp_path / "runs").rglob("attribution.json")
    artifact = load_attribution(path)
    assert list(artifact.groups) == groups and artifact.total.count == 64
    assert any(p.name.startswith("events.out.tfevents") for p in path.parent.iterdir())
    assert "secant curvature by layer group: model.transformer.wte" in out
    # Token level: 128 validation sequences of 24 predicted tokens each.
    assert " of 3072\n" in out.split("misclassified tokens: ")[1]
    assert "## Treat and verify" in out and "flagged: ['transformer." in out
