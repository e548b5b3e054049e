import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_beta import BetaMomentumCallback, critical_momentum
from lightning_beta.callbacks.beta_momentum import SGD_MOMENTUM_FLOOR
from tests.helpers import StepRecorder, TinyModel, make_loader, read_scalars, trainer_kwargs


def sgd(lr=0.05, momentum=0.9, **kw):
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, **kw)


def adam(lr=0.01, **kw):
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr, **kw)


def cosine_step(total):
    return lambda opt: {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), "interval": "step"}


def warmup_cosine(warmup, total, start_factor=0.1):
    def build(opt):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start_factor, total_iters=warmup)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup)
        seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[warmup])
        return {"scheduler": seq, "interval": "step"}

    return build


def fit(tmp_path, model, callbacks, loader=None, **overrides):
    recorder = StepRecorder()
    trainer = pl.Trainer(callbacks=[*callbacks, recorder], **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader or make_loader())
    return trainer, recorder


def assert_critical(recorder, rule="paper", group=0, optimizer=0, floor=SGD_MOMENTUM_FLOOR):
    lrs, momenta = recorder.lrs(group, optimizer), recorder.momenta(group, optimizer)
    assert lrs, "no optimizer step recorded"
    for lr, mu in zip(lrs, momenta):
        expected = critical_momentum(lr, rule=rule, min_momentum=floor)
        assert mu == pytest.approx(expected, abs=1e-7), (lr, mu, expected)
    return lrs, momenta


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop", "adamw", "nadam"])
def test_step_cosine_momentum_used_equals_critical(tmp_path, opt):
    factories = {
        "sgd": sgd(lr=0.05),
        "adam": adam(lr=0.01),
        "rmsprop": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5),
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),
        "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=0.01),
    }
    model = TinyModel(factories[opt], cosine_step(8))
    trainer, rec = fit(tmp_path, model, [BetaMomentumCallback()], max_epochs=2)
    floor = SGD_MOMENTUM_FLOOR if opt in ("sgd", "rmsprop") else 0.0
    lrs, _ = assert_critical(rec, floor=floor)
    assert len(lrs) == 8 and len(set(lrs)) > 4  # the lr really moved, and every step was checked
    if opt in ("adam", "adamw", "nadam"):
        beta2 = trainer.optimizers[0].param_groups[0]["betas"][1]
        assert beta2 == 0.999


def test_exact_rule(tmp_path):
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.05), cosine_step(4)), [BetaMomentumCallback(rule="exact")])
    _lrs, momenta = assert_critical(rec, rule="exact")
    assert momenta[0] == pytest.approx((1 - math.sqrt(0.05)) ** 2)


def test_warmup_then_cosine(tmp_path):
    model = TinyModel(sgd(lr=0.1), warmup_cosine(3, 12))
    _, rec = fit(tmp_path, model, [BetaMomentumCallback()], max_epochs=3)
    lrs, momenta = assert_critical(rec)
    assert lrs[0] == pytest.approx(0.01) and momenta[0] == pytest.approx(0.8)
    assert max(lrs) == pytest.approx(0.1)


def test_epoch_interval_steplr(tmp_path):
    sched = lambda opt: {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), "interval": "epoch"}
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.04), sched), [BetaMomentumCallback()], max_epochs=3)
    lrs, momenta = assert_critical(rec)
    assert lrs == pytest.approx([0.04] * 4 + [0.02] * 4 + [0.01] * 4)
    assert momenta[-1] == pytest.approx(0.8)


def test_reduce_lr_on_plateau(tmp_path):
    def sched(opt):
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.25, patience=0)
        return {"scheduler": plateau, "monitor": "train_loss", "interval": "epoch"}

    class Stuck(TinyModel):
        # A loss that never improves makes the plateau scheduler cut the lr every epoch.
        def training_step(self, batch, batch_idx):
            self.log("train_loss", 1.0)
            return self(batch[0]).sum() * 0 + 1.0

    model = Stuck(sgd(lr=0.04), sched)
    _, rec = fit(tmp_path, model, [BetaMomentumCallback()], max_epochs=3)
    lrs, _ = assert_critical(rec)
    assert lrs[0] == pytest.approx(0.04) and lrs[-1] < 0.04


def test_gradient_accumulation_writes_once_per_optimizer_step(tmp_path):
    calls = []

    class Counting(BetaMomentumCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            calls.append(trainer.global_step)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    model = TinyModel(sgd(lr=0.05), cosine_step(4))
    _, rec = fit(tmp_path, model, [Counting()], make_loader(n=96), accumulate_grad_batches=3, limit_train_batches=12)
    assert calls == [0, 1, 2, 3]
    assert len(rec.steps) == 4
    assert_critical(rec)


def test_two_param_groups_one_frozen(tmp_path):
    def groups(m):
        return torch.optim.SGD(
            [
                {"params": m.body.parameters(), "lr": 0.0, "momentum": 0.5, "name": "body"},
                {"params": m.head.parameters(), "lr": 0.04, "momentum": 0.9, "name": "head"},
            ]
        )

    logger = TensorBoardLogger(tmp_path, name="tb")
    _, rec = fit(tmp_path, TinyModel(groups), [BetaMomentumCallback()], logger=logger)
    assert rec.momenta(group=0) == [0.5] * 4  # frozen group keeps its momentum
    assert_critical(rec, group=1)
    scalars = read_scalars(logger.log_dir)
    assert "beta/momentum/head" in scalars and "beta/momentum/body" not in scalars
    assert [v for _, v in scalars["beta/momentum/head"]] == pytest.approx([0.6] * 4)


def test_logged_values_are_the_written_ones(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    _, rec = fit(
        tmp_path,
        TinyModel(sgd(lr=0.05), cosine_step(8)),
        [BetaMomentumCallback()],
        logger=logger,
        max_epochs=2,
        log_every_n_steps=2,
    )
    scalars = read_scalars(logger.log_dir)
    logged = dict(scalars["beta/momentum"])
    # Lightning's own schedule, as for `self.log`: (step + 1) % 2 == 0, no special first step
    assert sorted(logged) == [1, 3, 5, 7]
    used = rec.momenta()
    for step, value in logged.items():
        assert value == pytest.approx(used[step], abs=1e-6)


def test_no_logging_when_disabled(tmp_path):
    logger = CSVLogger(tmp_path)
    fit(tmp_path, TinyModel(), [BetaMomentumCallback(log_momentum=False)], logger=logger)
    logger.finalize("success")
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "beta/momentum" not in text


def test_tensor_lr_and_betas_written_in_place(tmp_path):
    tensors = {}

    def build(m):
        lr = torch.tensor(0.01)
        betas = (torch.tensor(0.9), torch.tensor(0.999))
        tensors.update(lr=lr, beta1=betas[0], beta2=betas[1])
        return torch.optim.Adam(m.parameters(), lr=lr, betas=betas)

    trainer, rec = fit(tmp_path, TinyModel(build), [BetaMomentumCallback()])
    group = trainer.optimizers[0].param_groups[0]
    assert group["betas"][0] is tensors["beta1"]  # updated in place, not replaced
    assert tensors["beta1"].item() == pytest.approx(0.8)
    assert tensors["beta2"].item() == pytest.approx(0.999)
    assert_critical(rec, floor=0.0)


def test_tensor_lr_with_float_momentum_sgd(tmp_path):
    build = lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(0.0025), momentum=0.5)
    _, rec = fit(tmp_path, TinyModel(build), [BetaMomentumCallback()])
    assert rec.momenta() == pytest.approx([0.9] * 4)


class ManualTwoOptimizers(pl.LightningModule):
    """A GAN-style module: two optimizers stepped by hand, with their own schedulers."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(8, 8)
        self.disc = nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        loss_d = nn.functional.cross_entropy(self.disc(x), y)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = nn.functional.cross_entropy(self.disc(self.gen(x)), y)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        sched_g.step()
        sched_d.step()

    def configure_optimizers(self):
        opt_g = torch.optim.SGD(self.gen.parameters(), lr=0.04, momentum=0.9)
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=0.01)
        return [opt_g, opt_d], [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=4),
            torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=0.5),
        ]


def test_manual_optimization_two_optimizers(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    _, rec = fit(tmp_path, ManualTwoOptimizers(), [BetaMomentumCallback()], logger=logger)
    lrs_g, _ = assert_critical(rec, optimizer=0)
    lrs_d, _ = assert_critical(rec, optimizer=1, floor=0.0)
    assert len(lrs_g) == len(lrs_d) == 4
    assert lrs_d == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    scalars = read_scalars(logger.log_dir)
    assert {"beta/momentum/opt0", "beta/momentum/opt1"} <= set(scalars)


def test_sgd_built_without_momentum_is_switched_on(tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer, rec = fit(tmp_path, TinyModel(sgd(lr=0.01, momentum=0.0)), [BetaMomentumCallback()])
    assert "built with momentum 0; momentum is switched on" in caplog.text
    assert rec.momenta() == pytest.approx([0.8] * 4)
    state = trainer.optimizers[0].state
    assert all("momentum_buffer" in state[p] and state[p]["momentum_buffer"] is not None for p in state)


def test_lr_above_quarter_uses_floor_and_keeps_buffer_fresh(tmp_path):
    """lr 0.4 then 0.01: the clamped steps use a tiny positive momentum, so the buffer tracks the gradient."""
    sched = lambda opt: {
        "scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.025),
        "interval": "step",
    }
    grads = []

    class GradTap(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(pl_module.head.weight.grad.clone())

    model = TinyModel(sgd(lr=0.4, momentum=0.9), sched)
    buffers = []

    class BufferTap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            buffers.append(trainer.optimizers[0].state[pl_module.head.weight]["momentum_buffer"].clone())

    with pytest.warns(UserWarning, match=r"lr=0.4 is clamped to `min_momentum`=0.0 \(warned once\)"):
        _, rec = fit(tmp_path, model, [BetaMomentumCallback(), GradTap(), BufferTap()])
    assert rec.momenta()[:2] == [SGD_MOMENTUM_FLOOR] * 2
    assert rec.momenta()[2:] == pytest.approx([0.8] * 2)
    # After a floored step the buffer is the gradient of that step, not a stale one.
    torch.testing.assert_close(buffers[1], grads[1], rtol=1e-4, atol=1e-6)
    # The first step at momentum 0.8 continues from that fresh buffer.
    torch.testing.assert_close(buffers[2], 0.8 * buffers[1] + grads[2], rtol=1e-4, atol=1e-6)


def test_clamping_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, TinyModel(sgd(lr=1e-6)), [BetaMomentumCallback()], max_epochs=2)
    clamp = [w for w in caught if "is clamped" in str(w.message)]
    assert len(clamp) == 1
    assert "lr=1e-06" in str(clamp[0].message) and "`max_momentum`=0.99" in str(clamp[0].message)


@pytest.mark.parametrize(("switch_at", "expected_switch"), [(3, 3), (0.5, 4)])
def test_hybrid_switch_int_and_fraction(tmp_path, switch_at, expected_switch):
    cb = BetaMomentumCallback(switch_at=switch_at, constant_momentum=0.95)
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.05), cosine_step(8)), [cb], max_epochs=2)
    assert cb.switch_step == expected_switch
    momenta, lrs = rec.momenta(), rec.lrs()
    for step, (lr, mu) in enumerate(zip(lrs, momenta)):
        expected = 0.95 if step >= expected_switch else critical_momentum(lr)
        assert mu == pytest.approx(expected), step


def test_hybrid_crossover_after_warmup(tmp_path):
    # warmup 0.001 -> 0.04 (physics 0.94 falls below 0.9), then cosine to 0 (rises through 0.9 again).
    cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.04), warmup_cosine(3, 16, start_factor=0.025)), [cb], max_epochs=4)
    lrs, momenta = rec.lrs(), rec.momenta()
    physics = [critical_momentum(lr) for lr in lrs]
    assert physics[0] > 0.9  # warmup starts above: not a crossover
    below = next(i for i, p in enumerate(physics) if p < 0.9)
    first_reach = next(i for i, p in enumerate(physics) if i > below and p >= 0.9)
    assert cb.switch_step == first_reach
    assert momenta[:first_reach] == pytest.approx(physics[:first_reach])
    assert momenta[first_reach:] == pytest.approx([0.9] * (len(momenta) - first_reach))


def test_fraction_switch_needs_known_length(tmp_path):
    cb = BetaMomentumCallback(switch_at=0.5)
    trainer = pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, max_epochs=-1, max_steps=-1))

    with pytest.raises(MisconfigurationException, match="run's length is unknown"):
        trainer.fit(TinyModel(), make_loader())


def test_cycle_momentum_schedulers_are_refused(tmp_path):
    def one_cycle(opt):
        return {"scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4), "interval": "step"}

    with pytest.raises(MisconfigurationException, match="OneCycleLR with `cycle_momentum=True`.*cycle_momentum=False"):
        fit(tmp_path, TinyModel(sgd(), one_cycle), [BetaMomentumCallback()])

    def one_cycle_off(opt):
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4, cycle_momentum=False)
        return {"scheduler": sched, "interval": "step"}

    _, rec = fit(tmp_path, TinyModel(sgd(), one_cycle_off), [BetaMomentumCallback()])
    assert_critical(rec)


def test_unsupported_optimizer_raises_or_warns(tmp_path):
    adagrad = lambda m: torch.optim.Adagrad(m.parameters(), lr=0.01)
    with pytest.raises(MisconfigurationException, match=r"optimizer 0 \(Adagrad\).*on_unsupported=\"warn\""):
        fit(tmp_path, TinyModel(adagrad), [BetaMomentumCallback()])
    with pytest.warns(UserWarning, match=r"optimizer 0 \(Adagrad\).*left unchanged"):
        trainer, _ = fit(tmp_path, TinyModel(adagrad), [BetaMomentumCallback(on_unsupported="warn")])
    assert "momentum" not in trainer.optimizers[0].param_groups[0]


def test_wrapped_optimizer_is_unwrapped():
    from lightning_beta._optim import momentum_slot, unwrap_optimizer

    inner = torch.optim.Adam([nn.Parameter(torch.zeros(1))])

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Wrapper(Wrapper(inner))) is inner
    assert momentum_slot(Wrapper(inner)) == "betas"


def test_resume_mid_run_gives_same_trajectory(tmp_path):
    """8 steps straight vs 4 steps, checkpoint, resume to 8: the same lr and momentum at every step."""

    def model():
        torch.manual_seed(1)
        # warmup from 0.001 (physics 0.94) to 0.01 (0.8), cosine back down: lr 0.0025 at step 6 gives 0.9 up to
        # rounding (0.8999...), so the crossover is at step 7, the first step with lr < 0.0025.
        return TinyModel(sgd(lr=0.01), warmup_cosine(2, 8, start_factor=0.1))

    kwargs = dict(max_epochs=2, enable_checkpointing=True)
    straight_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    _, straight = fit(tmp_path / "a", model(), [straight_cb], **kwargs)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    _, first = fit(tmp_path / "b", model(), [first_cb, ckpt], max_epochs=1, enable_checkpointing=True)
    resumed_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    recorder = StepRecorder()
    trainer = pl.Trainer(callbacks=[resumed_cb, recorder], **trainer_kwargs(tmp_path / "b", **kwargs))
    trainer.fit(model(), make_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    combined = first.steps + recorder.steps
    assert [s["global_step"] for s in combined] == list(range(8))
    assert [s["groups"] for s in combined] == [s["groups"] for s in straight.steps]
    assert resumed_cb.switch_step == straight_cb.switch_step == 7


def test_state_dict_round_trip_and_version():
    cb = BetaMomentumCallback(switch_at="crossover")
    cb.switch_step, cb._crossover_armed = 17, True
    other = BetaMomentumCallback(switch_at="crossover")
    other.load_state_dict(cb.state_dict())
    assert other.switch_step == 17 and other._crossover_armed
    with pytest.raises(ValueError, match="state has version 99; this release reads version 1"):
        other.load_state_dict({**cb.state_dict(), "version": 99})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rule": "fast"}, ValueError, "`rule` must be one of"),
        ({"curvature": -1.0}, ValueError, "`curvature` must be a finite number > 0, got -1.0"),
        ({"curvature": "high"}, TypeError, "`curvature` must be a positive float, got str"),
        ({"min_momentum": 0.5, "max_momentum": 0.4}, ValueError, r"`min_momentum` \(0.5\) must be <= `max_momentum`"),
        ({"max_momentum": 1.0}, ValueError, "`max_momentum` must be < 1"),
        ({"min_momentum": -0.1}, ValueError, "`min_momentum` must be >= 0"),
        ({"switch_at": 1.5}, ValueError, r"`switch_at` as a fraction of training must be in \(0, 1\), got 1.5"),
        ({"switch_at": 0.0}, ValueError, r"`switch_at` as a fraction of training must be in \(0, 1\)"),
        ({"switch_at": -3}, ValueError, "`switch_at` as an optimizer step must be >= 0, got -3"),
        ({"switch_at": "later"}, ValueError, '`switch_at` as a string must be "crossover"'),
        ({"switch_at": True}, TypeError, "`switch_at` must be None, an int step"),
        ({"switch_at": [3]}, TypeError, "`switch_at` must be None, an int step.*got list"),
        ({"constant_momentum": 1.0}, ValueError, r"`constant_momentum` must be in \[0, 1\), got 1.0"),
        ({"constant_momentum": "0.9"}, TypeError, "`constant_momentum` must be a float, got str"),
        ({"on_unsupported": "ignore"}, ValueError, '`on_unsupported` must be "raise" or "warn"'),
        ({"log_momentum": 1}, TypeError, "`log_momentum` must be a bool, got int"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BetaMomentumCallback(**kwargs)


def test_nan_lr_is_rejected(tmp_path):
    sched = lambda opt: {
        "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float("nan") if step >= 1 else 1.0),
        "interval": "step",
    }
    with pytest.raises(ValueError, match="learning rate `lr` must be a finite number >= 0, got nan"):
        fit(tmp_path, TinyModel(sgd(), sched), [BetaMomentumCallback()])


# --- Logging through Lightning: the same schedule, step axis and callback_metrics as the user's `self.log` ---


def csv_steps(log_dir, key):
    import csv

    with open(f"{log_dir}/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {int(row["step"]): float(row[key]) for row in rows if row.get(key) not in (None, "")}


@pytest.mark.parametrize("every", [0, 1, 3, 50])
def test_logged_on_the_steps_of_the_users_self_log(tmp_path, every):
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, rec = fit(
        tmp_path,
        TinyModel(sgd(lr=0.05), cosine_step(120)),
        [BetaMomentumCallback()],
        make_loader(n=960),
        logger=[csv_logger, tb_logger],
        log_every_n_steps=every,
        limit_train_batches=120,
    )
    csv_logger.finalize("success")
    user = csv_steps(csv_logger.log_dir, "train_loss") if every else {}
    ours = csv_steps(csv_logger.log_dir, "beta/momentum") if every else {}
    expected = [] if every == 0 else [s for s in range(120) if (s + 1) % every == 0]
    assert sorted(user) == expected  # Lightning's own schedule, 0 = never
    assert sorted(ours) == sorted(user)
    scalars = read_scalars(tb_logger.log_dir)
    assert [s for s, _ in scalars.get("beta/momentum", [])] == sorted(user)
    used = rec.momenta()
    for step, value in ours.items():
        assert value == pytest.approx(used[step], abs=1e-6)
    if every:
        assert trainer.callback_metrics["beta/momentum"].item() == pytest.approx(used[expected[-1]], abs=1e-6)
    else:
        assert "beta/momentum" not in trainer.callback_metrics


class ManualTwoOptimizersLogging(ManualTwoOptimizers):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.log("user_key", float(batch_idx))


def test_manual_two_optimizers_logged_on_the_users_batches(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    _, rec = fit(
        tmp_path,
        ManualTwoOptimizersLogging(),
        [BetaMomentumCallback()],
        make_loader(n=48),
        logger=logger,
        log_every_n_steps=2,
        limit_train_batches=6,
    )
    logger.finalize("success")
    user = csv_steps(logger.log_dir, "user_key")
    assert sorted(user) == [1, 3, 5]  # batches, not optimizer steps (global_step reaches 12)
    assert user == {1: 1.0, 3: 3.0, 5: 5.0}
    for opt_idx in (0, 1):
        ours = csv_steps(logger.log_dir, f"beta/momentum/opt{opt_idx}")
        assert sorted(ours) == sorted(user)
        used = rec.momenta(optimizer=opt_idx)
        for batch, value in ours.items():
            assert value == pytest.approx(used[batch], abs=1e-6)


# --- switch_at counts training batches that stepped, also under manual optimization with two optimizers ---


@pytest.mark.parametrize(("switch_at", "expected"), [(2, 2), (0.5, 3)])
def test_switch_at_counts_batches_with_two_manual_optimizers(tmp_path, switch_at, expected):
    cb = BetaMomentumCallback(switch_at=switch_at, constant_momentum=0.95)
    _, rec = fit(tmp_path, ManualTwoOptimizers(), [cb], make_loader(n=48), limit_train_batches=6)
    assert cb.switch_step == expected
    for opt_idx, floor in ((0, SGD_MOMENTUM_FLOOR), (1, 0.0)):
        momenta, lrs = rec.momenta(optimizer=opt_idx), rec.lrs(optimizer=opt_idx)
        assert len(momenta) == 6
        for batch, (lr, mu) in enumerate(zip(lrs, momenta)):
            want = 0.95 if batch >= expected else critical_momentum(lr, min_momentum=floor)
            assert mu == pytest.approx(want), (opt_idx, batch)


# --- Dampening and Nesterov ---


def test_dampening_enters_the_step_size(tmp_path):
    # lr 0.04 with dampening 0.75 is heavy ball at 0.04 * 0.25 = 0.01: mu = 1 - 2*sqrt(0.01) = 0.8 (not 0.6).
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.04, dampening=0.75)), [BetaMomentumCallback()])
    assert rec.momenta() == pytest.approx([0.8] * 4)
    # exact rule at lr 0.09, dampening 5/9: lr_eff = 0.04, (1 - 0.2)**2 = 0.64
    _, rec = fit(tmp_path, TinyModel(sgd(lr=0.09, dampening=5 / 9)), [BetaMomentumCallback(rule="exact")])
    assert rec.momenta() == pytest.approx([0.64] * 4)


def test_nesterov_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rec = fit(tmp_path, TinyModel(sgd(lr=0.01, nesterov=True)), [BetaMomentumCallback()], max_epochs=2)
    nesterov = [w for w in caught if "Nesterov" in str(w.message)]
    assert len(nesterov) == 1
    assert "assumes heavy-ball momentum" in str(nesterov[0].message)
    assert rec.momenta() == pytest.approx([0.8] * 8)


# --- Registry: wrappers, refusals, registration ---


class Lookahead(torch.optim.Optimizer):
    """Mirrors timm's Lookahead: an Optimizer that shares `base_optimizer.param_groups` and exposes it as
    `base_optimizer`, stepping the slow weights every k steps."""

    def __init__(self, base_optimizer, alpha=0.5, k=2):
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state
        self.alpha, self.k, self.n = alpha, k, 0
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    def step(self, closure=None):
        loss = self.base_optimizer.step(closure)
        self.n += 1
        if self.n % self.k == 0:
            params = [p for g in self.param_groups for p in g["params"]]
            with torch.no_grad():
                for p, slow in zip(params, self.slow):
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss


def test_lookahead_base_optimizer_is_unwrapped(tmp_path):
    from lightning_beta._optim import momentum_slot, unwrap_optimizer

    build = lambda m: Lookahead(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.5))
    trainer, rec = fit(tmp_path, TinyModel(build, cosine_step(4)), [BetaMomentumCallback()])
    assert unwrap_optimizer(trainer.optimizers[0]) is trainer.optimizers[0].base_optimizer
    assert momentum_slot(trainer.optimizers[0]) == "momentum"
    assert_critical(rec)


def make_lion_class():
    class Lion(torch.optim.Optimizer):
        """Mirrors the Lion update: the betas interpolate the update direction."""

        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):
            super().__init__(params, {"lr": lr, "betas": betas})

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    buf = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                    p.add_(torch.sign(beta1 * buf + (1 - beta1) * p.grad), alpha=-group["lr"])
                    buf.mul_(beta2).add_(p.grad, alpha=1 - beta2)
            return loss

    return Lion


def test_lion_is_refused_with_the_registration_way_in(tmp_path):
    lion_cls = make_lion_class()
    build = lambda m: lion_cls(m.parameters(), lr=1e-3)
    with pytest.raises(
        MisconfigurationException,
        match=r"optimizer 0 \(Lion\): its betas interpolate the update direction.*"
        r"lightning_beta.register_momentum\(Lion, slot=\"betas\"\).*on_unsupported=\"warn\"",
    ):
        fit(tmp_path, TinyModel(build), [BetaMomentumCallback()])
    with pytest.warns(UserWarning, match=r"\(Lion\).*register_momentum.*left unchanged"):
        trainer, _ = fit(tmp_path, TinyModel(build), [BetaMomentumCallback(on_unsupported="warn")])
    assert trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.99)


def test_real_adafactor_and_unknown_betas_are_refused(tmp_path):
    adafactor = lambda m: torch.optim.Adafactor(m.parameters(), lr=0.01)
    with pytest.raises(MisconfigurationException, match=r"\(Adafactor\): its first moment.*register_momentum"):
        fit(tmp_path, TinyModel(adafactor), [BetaMomentumCallback()])

    class HomeMade(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.01, "betas": (0.9, 0.9)})

    with pytest.raises(MisconfigurationException, match=r"\(HomeMade\): the package does not know.*register_momentum"):
        fit(tmp_path, TinyModel(lambda m: HomeMade(m.parameters())), [BetaMomentumCallback()])


def test_register_momentum_lets_the_callback_write(tmp_path):
    from lightning_beta import register_momentum

    lion_cls = make_lion_class()  # a class of this test only: the registration does not leak into other tests
    register_momentum(lion_cls, slot="betas")
    _, rec = fit(tmp_path, TinyModel(lambda m: lion_cls(m.parameters(), lr=0.01)), [BetaMomentumCallback()])
    assert rec.momenta() == pytest.approx([0.8] * 4)


def test_register_momentum_rejects_bad_arguments():
    from lightning_beta import register_momentum

    with pytest.raises(ValueError, match='`slot` must be "momentum" or "betas", got \'beta\''):
        register_momentum(torch.optim.SGD, slot="beta")
    with pytest.raises(TypeError, match="`optimizer_cls` must be an optimizer class, got SGD"):
        register_momentum(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), slot="momentum")


# --- Keys stay the same for the fit when a param group is added mid-run ---


def test_added_param_group_keeps_the_keys(tmp_path):
    class AddHead(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                trainer.optimizers[0].add_param_group({"params": pl_module.head.parameters(), "lr": 0.0025})

    build = lambda m: torch.optim.SGD(m.body.parameters(), lr=0.01, momentum=0.9)
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, TinyModel(build), [BetaMomentumCallback(), AddHead()], logger=logger)
    logger.finalize("success")
    assert csv_steps(logger.log_dir, "beta/momentum") == pytest.approx({0: 0.8, 1: 0.8, 2: 0.8, 3: 0.8})
    assert csv_steps(logger.log_dir, "beta/momentum/pg1") == pytest.approx({2: 0.9, 3: 0.9})
    text = open(f"{logger.log_dir}/metrics.csv").read()
    assert "beta/momentum/pg0" not in text


def test_previous_release_state_resumes_and_derives_the_keys(tmp_path):
    old = {"version": 1, "switch_step": 3, "crossover_armed": True, "clamp_warned": False}  # no "fit_groups"
    cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.95)
    cb.load_state_dict(old)
    assert cb.switch_step == 3 and cb._fit_groups is None
    cb.on_fit_start(pl.Trainer(logger=False, callbacks=[]), None)  # no optimizers: nothing to name
    assert cb._fit_groups == []
    state = cb.state_dict()
    assert state["version"] == 1 and state["fit_groups"] == []
    with pytest.raises(ValueError, match="state has version 2; this release reads version 1"):
        cb.load_state_dict({**state, "version": 2})


# --- Tensor lr: the same decisions on the device ---


def adam_tensors(lr=0.01):
    return lambda m: torch.optim.Adam(
        m.parameters(), lr=torch.tensor(lr), betas=(torch.tensor(0.9), torch.tensor(0.999)), capturable=False
    )


def test_crossover_on_device_switches_at_the_same_step(tmp_path):
    sched = warmup_cosine(3, 16, start_factor=0.025)
    host_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    _, host = fit(tmp_path / "host", TinyModel(adam(lr=0.04), sched), [host_cb], max_epochs=4)
    device_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    _, device = fit(tmp_path / "device", TinyModel(adam_tensors(lr=0.04), sched), [device_cb], max_epochs=4)
    assert device_cb.switch_step == host_cb.switch_step is not None
    assert device.momenta() == pytest.approx(host.momenta(), abs=1e-6)
    assert device.lrs() == pytest.approx(host.lrs())


def test_tensor_lr_frozen_group_keeps_its_tensor_momentum(tmp_path):
    def build(m):
        return torch.optim.Adam(
            [
                {
                    "params": m.body.parameters(),
                    "lr": torch.tensor(0.0),
                    "betas": (torch.tensor(0.5), torch.tensor(0.9)),
                },
                {
                    "params": m.head.parameters(),
                    "lr": torch.tensor(0.01),
                    "betas": (torch.tensor(0.9), torch.tensor(0.9)),
                },
            ]
        )

    _, rec = fit(tmp_path, TinyModel(build), [BetaMomentumCallback(switch_at="crossover")])
    assert rec.momenta(group=0) == pytest.approx([0.5] * 4)
    assert rec.momenta(group=1) == pytest.approx([0.8] * 4)


def test_float_slot_with_accelerator_lr_is_flagged():
    from lightning_beta.callbacks.beta_momentum import _syncs_per_step

    meta_lr = torch.tensor(0.01, device="meta")  # stands for an lr tensor on an accelerator
    assert _syncs_per_step({"lr": meta_lr, "momentum": 0.9}, "momentum")
    assert not _syncs_per_step({"lr": meta_lr, "betas": (torch.tensor(0.9, device="meta"), 0.999)}, "betas")
    assert not _syncs_per_step({"lr": torch.tensor(0.01), "momentum": 0.9}, "momentum")  # CPU: no device sync
    assert not _syncs_per_step({"lr": 0.01, "momentum": 0.9}, "momentum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_lr_with_float_momentum_warns_once(tmp_path):
    build = lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(0.0025, device=m.device), momentum=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rec = fit(tmp_path, TinyModel(build), [BetaMomentumCallback()], accelerator="gpu", max_epochs=2)
    syncs = [w for w in caught if "costs a host sync per step" in str(w.message)]
    assert len(syncs) == 1 and "stored as Tensors" in str(syncs[0].message)
    assert rec.momenta() == pytest.approx([0.9] * 8)


def test_checkpoint_of_the_previous_release_resumes(tmp_path):
    """A checkpoint whose callback state has the previous release's layout (no ``fit_groups``) resumes."""

    def model():
        torch.manual_seed(1)
        return TinyModel(sgd(lr=0.01), warmup_cosine(2, 8, start_factor=0.1))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    fit(tmp_path / "a", model(), [first_cb, ckpt], max_epochs=1, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("BetaMomentumCallback")]
    del state["fit_groups"]
    assert set(state) == {"version", "switch_step", "crossover_armed", "clamp_warned"}
    torch.save(checkpoint, path)

    resumed_cb = BetaMomentumCallback(switch_at="crossover", constant_momentum=0.9)
    logger = CSVLogger(tmp_path, name="csv")
    recorder = StepRecorder()
    trainer = pl.Trainer(
        callbacks=[resumed_cb, recorder],
        **trainer_kwargs(tmp_path / "a", max_epochs=2, enable_checkpointing=True, logger=logger),
    )
    trainer.fit(model(), make_loader(), ckpt_path=str(path))
    logger.finalize("success")
    assert [s["global_step"] for s in recorder.steps] == [4, 5, 6, 7]
    assert resumed_cb.switch_step == 7 and resumed_cb._fit_groups == [1]
    assert sorted(csv_steps(logger.log_dir, "beta/momentum")) == [4, 5, 6, 7]


class ManualLogsAroundSteps(ManualTwoOptimizers):
    """Logs one key before the optimizer steps and one after them, as GAN modules do."""

    def training_step(self, batch, batch_idx):
        self.log("loss_before", float(batch_idx) + 0.5)
        super().training_step(batch, batch_idx)
        self.log("loss_after", float(batch_idx))


def test_manual_optimization_keeps_the_users_keys_of_the_first_batch(tmp_path):
    # On the first batch of an epoch Lightning resets a hook's logged values when the logging hook changes; logging
    # from inside the optimizer steps would drop "loss_before" there.
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, ManualLogsAroundSteps(), [BetaMomentumCallback()], logger=logger, log_every_n_steps=1)
    logger.finalize("success")
    assert csv_steps(logger.log_dir, "loss_before") == {0: 0.5, 1: 1.5, 2: 2.5, 3: 3.5}
    assert sorted(csv_steps(logger.log_dir, "loss_after")) == [0, 1, 2, 3]
    for key in ("beta/momentum/opt0", "beta/momentum/opt1"):
        assert sorted(csv_steps(logger.log_dir, key)) == [0, 1, 2, 3]


def test_backbone_finetuning_keeps_the_keys(tmp_path):
    from lightning.pytorch.callbacks import BackboneFinetuning

    class WithBackbone(TinyModel):
        def __init__(self):
            super().__init__(lambda m: torch.optim.SGD(m.head.parameters(), lr=0.01, momentum=0.9))
            self.backbone = self.body

    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, WithBackbone(), [finetune, BetaMomentumCallback()], logger=logger, max_epochs=2)
    logger.finalize("success")
    # the head keeps "beta/momentum" for the whole fit; the backbone (lr 0.01/10 = 0.001) joins as pg1 in epoch 1
    assert csv_steps(logger.log_dir, "beta/momentum") == pytest.approx({s: 0.8 for s in range(8)})
    expected_pg1 = critical_momentum(0.001)
    assert csv_steps(logger.log_dir, "beta/momentum/pg1") == pytest.approx({s: expected_pg1 for s in range(4, 8)})
