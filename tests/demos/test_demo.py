"""The demo's quiet block is scoped and leaves lightning_beta's own messages alone; one table under two devices."""

import json
import logging
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_beta import BetaMomentumCallback
from lightning_beta.demos.demo import QUIET_LOGGERS, quiet
from tests.helpers import TinyModel, make_loader, read_scalars, trainer_kwargs


def test_quiet_restores_loggers_and_warning_filters():
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    before = [(lg.level, list(lg.filters)) for lg in loggers]
    filters = list(warnings.filters)
    with quiet():
        assert warnings.filters != filters
    assert [(lg.level, list(lg.filters)) for lg in loggers] == before
    assert warnings.filters == filters


def test_quiet_hides_lightning_info_but_not_lightning_beta(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    sgd_without_momentum = lambda m: torch.optim.SGD(m.parameters(), lr=0.5)  # clamped, and momentum 0
    model = TinyModel(optimizer_fn=sgd_without_momentum)
    with quiet(), pytest.warns(UserWarning, match="is clamped to"):
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[BetaMomentumCallback()]))  # "GPU available"
        trainer.fit(model, make_loader())
    messages = [record.getMessage() for record in caplog.records]
    assert any("momentum is switched on" in m for m in messages)  # lightning_beta's rank_zero_info
    assert not any("GPU available" in m for m in messages)
    pl.Trainer(**trainer_kwargs(tmp_path))  # outside the block Lightning speaks again
    assert any("GPU available" in record.getMessage() for record in caplog.records)


def test_quiet_hides_lightning_info_once_pytorch_lightning_is_imported(tmp_path, caplog):
    """Importing ``pytorch_lightning`` moves ``lightning``'s info lines to its logger: still hidden, then restored."""
    pytest.importorskip("pytorch_lightning")
    caplog.set_level(logging.INFO)
    with quiet():
        pl.Trainer(**trainer_kwargs(tmp_path))
    assert not any("GPU available" in record.getMessage() for record in caplog.records)
    pl.Trainer(**trainer_kwargs(tmp_path))
    assert any("GPU available" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_devices_print_one_table_with_the_reduced_numbers(tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "lightning_beta", "demo", "--quick", "--epochs", "1", "--devices", "2"]
    result = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final val accuracy") == 1 and result.stdout.count("View the panels") == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("final val accuracy")).split()
    for name, printed in zip(("constant", "beta"), row[-2:]):
        logged = read_scalars(out / name)["val_acc"][-1][1]  # rank zero logs the value reduced over both ranks
        assert float(printed) == pytest.approx(logged, abs=5e-4)
    report = json.loads((out / "diagnosis.json").read_text())
    check = report["verification"]
    assert f"fixed {check['fixed']}, broken {check['broken']}, net {check['net']:+d}" in result.stdout


def test_the_demo_plants_a_fault_that_the_probe_names_and_the_restore_repairs(tmp_path):
    from torch.utils.data import Subset

    from lightning_beta.demos.demo import FAULT_GROUP, DemoConfig, run_demo
    from lightning_beta.demos.digits import load_digits_tensors

    result = run_demo(DemoConfig(out=tmp_path, epochs=2, quick=True, progress=False))
    report, fault = result.diagnosis, result.fault
    assert fault is not None and report is not None and report.surgery is not None
    # The probe the callback recorded names the damaged group; the marginal-statistics localizer cannot.
    assert fault.named["probe (ours)"] == FAULT_GROUP and report.flagged == [FAULT_GROUP]
    assert fault.named["drift (ours)"] != FAULT_GROUP
    assert report.surgery.policy == "restore" and report.surgery.groups_touched == [FAULT_GROUP]
    # Accuracies recomputed here, by argmax over the verification half (the odd validation samples).
    _, val = load_digits_tensors()
    half = Subset(val, range(1, len(val), 2))
    x = torch.stack([half[i][0] for i in range(len(half))])
    y = torch.stack([half[i][1] for i in range(len(half))])
    healthy = result.runs["beta schedule"].model.eval()
    with torch.no_grad():
        clean = float((healthy(x).argmax(1) == y).float().mean())
        after = float((report.model.eval()(x).argmax(1) == y).float().mean())
    assert fault.clean == pytest.approx(clean) and report.verification.accuracy_after == pytest.approx(after)
    assert clean - fault.faulty > 0.05  # the fault costs accuracy ...
    assert after - fault.faulty > 0.8 * (clean - fault.faulty)  # ... which the restore brings back
    table = result.table()
    assert f"{fault.faulty:.3f} -> {after:.3f}" in table and "probe (ours) net.layer2 (right)" in table
    saved = json.loads((tmp_path / "diagnosis.json").read_text())
    assert saved["surgery"]["policy"] == "restore" and saved["flagged"] == [FAULT_GROUP]
