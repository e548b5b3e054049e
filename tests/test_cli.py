"""The command line's user errors end with one line and exit code 2, never a traceback."""

import json
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta.cli import main
from lightning_beta.diagnosis import diagnose
from tests.helpers import TinyModel, make_loader, trainer_kwargs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_beta", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and "lightning_beta 0.1.0" in result.stdout
    result = run_cli("demo", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout and "--out" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--epochs", "0"], "argument --epochs: expected a whole number >= 1, got 0"),
        (["demo", "--epochs", "many"], "argument --epochs: expected a whole number >= 1, got 'many'"),
        (["demo", "--seed", "-1"], "argument --seed: expected a whole number >= 0, got -1"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_numbers_and_commands(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_non_root(tmp_path, capsys):  # pragma: no cover - CI runs as root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["demo", "--out", str(locked / "runs")]) == 2


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {target}: cannot create the directory" in err


def test_out_under_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["demo", "--out", str(target / "runs")]) == 2
    assert "cannot create the directory (Not a directory)" in capsys.readouterr().err


def test_report_errors_are_one_line(tmp_path):
    missing = run_cli("report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.json: no such file")
    assert "Traceback" not in missing.stderr

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    result = run_cli("report", str(garbage))
    assert result.returncode == 2 and "not JSON" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    result = run_cli("report", str(other))
    assert result.returncode == 2 and "not a lightning_beta artifact" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_on_a_checkpoint_names_what_to_pass(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    trainer.fit(TinyModel(), make_loader())
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    result = run_cli("report", str(checkpoint))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert (
        f"{checkpoint}: a torch/Lightning checkpoint, not a JSON artifact; pass the attribution.json" in result.stderr
    )
    assert "utf-8" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(tmp_path):
    result = run_cli("demo", "--accelerator", "gpu", "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "lightning-beta demo: error: --accelerator gpu --devices 1: not usable here (" in result.stderr


def test_bad_devices_is_one_line(tmp_path, capsys):
    assert main(["demo", "--devices", "many", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--accelerator cpu --devices many: not usable here" in err


def test_report_renders_a_diagnosis_that_made_things_worse(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    y[:6] = 1 - y[:6]  # label noise: errors to attribute
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(50):  # a decent model (the noisy labels left wrong), that an lr of 1e4 breaks
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    report = diagnose(net, data, data, localizer="gradient", top_k=1, lr=1e4, momentum=0.9, default_root_dir=tmp_path)
    assert report.worse
    path = tmp_path / "diagnosis.json"
    path.write_text(report.to_json())
    result = run_cli("report", str(path), "--markdown")
    assert result.returncode == 0, result.stderr
    assert "WORSE: the treated model is worse than its input" in result.stdout
    assert "| run | params trained | steps |" in result.stdout and "|---|---:|---:|" in result.stdout


DIGITS = [
    "--model",
    "lightning_beta.demos.digits.DigitsClassifier",
    "--data",
    "lightning_beta.demos.digits.DigitsDataModule",
]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from lightning_beta import DampingRegimeMonitor
    from lightning_beta.demos.digits import DigitsClassifier, DigitsDataModule

    tmp = tmp_path_factory.mktemp("digits")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp, max_epochs=2, limit_train_batches=6, callbacks=[DampingRegimeMonitor(log=False)])
    )
    trainer.fit(DigitsClassifier("mlp", lr=0.1), DigitsDataModule(seed=0))
    path = tmp / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_diagnose_a_checkpoint_on_the_digits(digits_checkpoint, tmp_path, capsys):
    from lightning_beta.demos.digits import DigitsClassifier, load_digits_tensors
    from lightning_beta.diagnosis import attribute_errors

    out = tmp_path / "report"
    args = [
        "diagnose",
        str(digits_checkpoint),
        *DIGITS,
        "--data-args",
        '{"seed": 0}',
        "--top-k",
        "1",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "diagnosis.json").read_text())
    assert (out / "diagnosis.md").read_text() in printed
    assert report["kind"] == "lightning_beta.diagnosis_report" and report["scan"]["n_records"] == 2
    # Localized on the even validation samples, verified on the odd ones, as the demo does.
    _, val = load_digits_tensors(0)
    model = DigitsClassifier.load_from_checkpoint(digits_checkpoint, map_location="cpu")
    even = DataLoader(torch.utils.data.Subset(val, range(0, len(val), 2)), batch_size=512)
    expected = attribute_errors(model, even)
    assert (
        report["scores"]["n_samples"] == len(range(0, len(val), 2)) and report["scores"]["ranking"] == expected.ranking
    )
    assert report["scores"]["scores"] == pytest.approx(expected.scores, rel=1e-5)
    assert report["flagged"] == expected.ranking[:1] and report["surgery"]["layers"] == expected.ranking[:1]
    assert report["verification"]["n_samples"] == len(range(1, len(val), 2))
    assert run_cli("report", str(out / "diagnosis.json")).returncode == 0


def test_diagnose_a_checkpoint_with_its_artifact_restores_the_faulty_group(tmp_path, capsys):
    from lightning_beta import LayerAttributionCallback
    from lightning_beta.demos.digits import DigitsClassifier, DigitsDataModule, load_digits_tensors

    pl.seed_everything(0, verbose=False)
    callback = LayerAttributionCallback(dirpath=tmp_path / "run")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=None, callbacks=[callback]))
    model = DigitsClassifier("mlp", lr=0.1)
    trainer.fit(model, DigitsDataModule(seed=0))
    _, val = load_digits_tensors(0)
    x, y = val.tensors
    odd = slice(1, None, 2)
    healthy = float((model.eval()(x[odd]).argmax(1) == y[odd]).float().mean())
    with torch.no_grad():  # a fault after training: one group's weights corrupted in the saved checkpoint
        model.net.fc2.weight.mul_(-2.0)
    faulty = float((model(x[odd]).argmax(1) == y[odd]).float().mean())
    trainer.save_checkpoint(tmp_path / "faulty.ckpt")
    out = tmp_path / "report"
    args = ["diagnose", str(tmp_path / "faulty.ckpt"), *DIGITS, "--artifact", str(callback.artifact_path)]
    assert main([*args, "--top-k", "1", "--out", str(out)]) == 0
    report = json.loads((out / "diagnosis.json").read_text())
    assert report["scores"]["method"] == "probe" and report["flagged"] == ["net.fc2"]
    assert report["surgery"]["policy"] == "restore" and report["surgery"]["epochs"] == 0
    check = report["verification"]
    assert check["accuracy_before"] == pytest.approx(faulty) and healthy - faulty > 0.1
    assert check["accuracy_after"] >= healthy - 0.01  # back to the healthy model's accuracy
    assert "L-BFGS iterations" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nowhere.Model"], "--model nowhere.Model: cannot import nowhere (No module named 'nowhere')"),
        (["--model", "Model"], "--model Model: expected a class path such as package.module.Class"),
        (["--data", "lightning_beta.demos.digits.DigitsClassifier"], "not a LightningDataModule subclass"),
        (["--model", "tests.helpers.TinyModel"], ": cannot load it as tests.helpers.TinyModel ("),
        (["--data-args", '{"colour": 1}'], "--data-args: lightning_beta.demos.digits.DigitsDataModule does not take"),
    ],
)
def test_diagnose_errors_are_one_line(digits_checkpoint, tmp_path, capsys, extra, message):
    assert main(["diagnose", str(digits_checkpoint), *DIGITS, *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
