"""The GPU proof: GPU tests, zero host syncs per step, overhead on GPU-sized models, and the demo on the GPU.

Run on a machine with one CUDA device: ``python benchmarks/gpu.py`` (about 5 minutes on one H200, 8 at most).
It needs no install of the package (the repository root is put on the path) and downloads nothing.

1. **Tests**: ``pytest -m gpu`` over the test files that carry the ``gpu`` marker.
2. **Zero host syncs**: tiny fits for every combination of callbacks (none, each alone, all three), lr kind (float,
   0-dim tensor) and precision (``32-true`` and ``bf16-mixed`` with SGD, ``16-mixed`` with a real ``GradScaler``
   and ``Adam(fused=True)``), with ``torch.cuda.set_sync_debug_mode("error")`` armed from ``on_train_batch_start``
   to ``on_train_batch_end`` of every training batch on which Lightning does not log. Any host sync in that window
   raises, in our callbacks, in Lightning or in torch. The bare fit of each combination shows what Lightning and
   torch sync on their own: where the bare fit is clean (expected: Lightning 2.x makes no host sync on a
   non-logging step of automatic optimization, and torch's fused optimizers with ``GradScaler`` none either) the
   callbacks are checked over the whole window; where it is not, the sync it hit is printed and, for that
   combination only, the guard is armed inside the callbacks' own methods instead. A tensor lr
   (a 0-dim device tensor, with tensor betas) is checked with ``Adam(foreach=True, capturable=True)`` in
   ``32-true`` and ``bf16-mixed`` and with ``Adam(fused=True)`` in ``16-mixed`` (and everywhere in the dry run: a
   capturable optimizer needs CUDA). Not with SGD: torch's foreach SGD step calls ``lr.item()`` itself, and SGD
   keeps its momentum as a Python float, so ``BetaMomentumCallback`` on SGD with a tensor lr makes one host copy
   per step (it says so at fit start); the same holds for float betas. torch's fused Adam turns tensor betas into
   floats (a sync in torch, which the bare fit shows; the callbacks are then checked inside their own methods).
   The lr scheduler steps after ``on_train_batch_end``, outside the window.
3. **Overhead**: a ResNet-18-shaped CNN (224 px, batch 128, fp32 and bf16-mixed) and a GPT-2-small-shaped
   transformer (12 layers, width 768, 1024 tokens, batch 8, bf16-mixed), written below (no torchvision, no weights).
   Configurations: bare, each callback, all three, ``LearningRateMonitor(log_momentum=True)`` and Lightning's
   documented ``grad_norm`` recipe; every repetition fits each configuration once, in a shuffled order; the
   reported ratio is the median over repetitions of (ms per step) / (ms per step of the bare fit of the same
   repetition). Separately, the time spent in each callback's own methods is measured (mean per optimizer step
   of the host time, and of the device time between CUDA events around them; the larger of the two is the hook's
   share of the bare step). "fp32" is ``32-true`` with torch's defaults (cuDNN convolutions may use TF32).
   Targets: ``LayerAttributionCallback`` <= 0.3% of the step; all three >= 9x cheaper than the ``grad_norm`` recipe.
4. **Demo**: ``python -m lightning_beta demo --quick --accelerator gpu``.

The results go to the "GPU" section of ``benchmarks/RESULTS.md`` (``--results PATH`` to write elsewhere,
``--no-write`` for none). The exit code is 1 if a test failed, a host sync was caught, or the demo failed; the
overhead targets are reported, not enforced.

``--dry-run`` runs everything on the CPU at tiny sizes (32 px, batch 4, a 2-layer transformer, 2 repetitions):
instead of the CUDA sync debug mode, ``Tensor.item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``, ``cpu``
and ``numpy`` raise inside the same window, and nothing is written unless ``--results`` is given. It is what
``tests/benchmarks/test_gpu_script.py`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _results import RESULTS, cpu_model, write_section  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback  # noqa: E402
from lightning_beta._logging import is_logging_step  # noqa: E402

GUARDED_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real run and the dry run."""

    device: str
    image_px: int
    image_batch: int
    resnet_width: int
    gpt_layers: int
    gpt_width: int
    gpt_heads: int
    gpt_vocab: int
    gpt_tokens: int
    gpt_batch: int
    repeats: int
    warmup: int
    steps: int
    sync_px: int = 32
    sync_batch: int = 8


REAL = Sizes("cuda", 224, 128, 64, 12, 768, 12, 50257, 1024, 8, repeats=5, warmup=6, steps=24)
DRY = Sizes("cpu", 32, 4, 8, 2, 32, 2, 128, 16, 4, repeats=2, warmup=2, steps=3, sync_batch=4)


# ---------------------------------------------------------------------------------------------------------------
# Models (shapes only: random init, nothing downloaded)
# ---------------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (conv1, bn1, layer1..layer4 of two blocks, fc): 62 parameter tensors at any width."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    """GPT-2 block: pre-LayerNorm causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 small's layout: token and position embeddings, a ``ModuleList`` of blocks, final norm, tied head."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int, tokens: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(tokens, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class Task(pl.LightningModule):
    """A classifier or a language model with a per-step cosine lr; ``optimizer`` names the torch optimizer used.

    ``"sgd"``: SGD, momentum 0.9, weight decay 5e-4 (foreach); ``"adam_fused"``, ``"adamw_fused"``: the fused Adam
    family; ``"adam_capturable"``: ``Adam(foreach=True, capturable=True)`` (CUDA only). With ``tensor_lr`` the lr
    is a 0-dim device tensor, and so are Adam's betas: a Python-float momentum slot cannot take a momentum computed
    on the device from a tensor lr without a host copy.
    """

    def __init__(self, net: nn.Module, optimizer: str, lr: float, tensor_lr: bool, max_steps: int) -> None:
        super().__init__()
        self.net = net
        self.optimizer_name = optimizer
        self.lr = lr
        self.tensor_lr = tensor_lr
        self.max_steps = max_steps

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
        self.log("train_loss", loss)  # what a user writes; Lightning copies it only when it logs
        return loss

    def configure_optimizers(self) -> Any:
        def value(x: float) -> float | Tensor:
            return torch.tensor(x, device=self.device) if self.tensor_lr else x

        params = self.parameters()
        if self.optimizer_name == "sgd":
            if self.tensor_lr:
                raise ValueError("SGD keeps its momentum as a Python float: use a fused Adam with a tensor lr")
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=5e-4)
        elif self.optimizer_name in ("adam_fused", "adamw_fused"):
            cls = torch.optim.Adam if self.optimizer_name == "adam_fused" else torch.optim.AdamW
            decay = 0.0 if self.optimizer_name == "adam_fused" else 0.1
            betas = (value(0.9), value(0.999))
            optimizer = cls(params, lr=value(self.lr), betas=betas, weight_decay=decay, fused=True)
        elif self.optimizer_name == "adam_capturable":  # every hyperparameter read on the device (CUDA only)
            betas = (value(0.9), value(0.999))
            optimizer = torch.optim.Adam(params, lr=value(self.lr), betas=betas, foreach=True, capturable=True)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer_name!r}")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.max_steps, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SameBatch(Dataset):
    """``length`` times the same batch, already on the device (no collation or copy in the timed loop)."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batch


def loader(batch: tuple[Tensor, Tensor], length: int) -> DataLoader:
    return DataLoader(SameBatch(batch, length), batch_size=None, shuffle=False)


def image_batch(px: int, n: int, device: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, px, px, generator=gen)
    return x.to(device), torch.randint(0, 1000, (n,), generator=gen).to(device)


def token_batch(s: Sizes) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, s.gpt_vocab, (s.gpt_batch, s.gpt_tokens + 1), generator=gen).to(s.device)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Callbacks of the script itself
# ---------------------------------------------------------------------------------------------------------------


class GradNormRecipe(pl.Callback):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` before each optimizer step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(pl.Callback):
    """Wall time of the training steps after ``warmup`` steps, with the device synchronised at both ends."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup + self.steps:
            synchronize(self.device)
            self.end = time.perf_counter()

    @property
    def ms_per_step(self) -> float:
        return 1000 * (self.end - self.start) / self.steps


class Guard:
    """Raise on a host sync while armed: CUDA's sync debug mode, or (on the CPU) the host-copy methods of Tensor."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.armed = False
        self._saved: dict[str, Any] = {}

    def arm(self) -> None:
        self.armed = True
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("error")

    def disarm(self) -> None:
        self.armed = False
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """On the CPU, patch the host-copy methods of Tensor for the duration (they raise while armed)."""
        if self.device != "cuda":
            for name in GUARDED_METHODS:
                original = getattr(Tensor, name)
                self._saved[name] = original
                setattr(Tensor, name, self._wrap(name, original))
        try:
            yield
        finally:
            self.disarm()
            for name, original in self._saved.items():
                setattr(Tensor, name, original)
            self._saved.clear()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        @functools.wraps(original)
        def wrapper(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if guard.armed:
                raise RuntimeError(f"host sync: Tensor.{name} called on a non-logging step")
            return original(tensor, *args, **kwargs)

        return wrapper


class ArmOnNonLoggingSteps(pl.Callback):
    """First in the callbacks list: marks (and in window mode arms) the non-logging training batches."""

    def __init__(self, guard: Guard, window: bool) -> None:
        self.guard, self.window = guard, window
        self.non_logging = False
        self.armed_steps = 0
        self.exception: BaseException | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.non_logging = not is_logging_step(trainer)
        if self.non_logging:
            self.armed_steps += 1
            if self.window:
                self.guard.arm()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # First in the list, so it runs before any other callback's on_exception (which may copy to the host).
        self.guard.disarm()
        self.exception = self.exception or exception


class Disarm(pl.Callback):
    """Last in the callbacks list: ends the window after every other callback's ``on_train_batch_end``."""

    def __init__(self, guard: Guard, arm: ArmOnNonLoggingSteps) -> None:
        self.guard, self.arm = guard, arm

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.guard.disarm()
        self.arm.non_logging = False


def own_methods(callback: pl.Callback) -> list[str]:
    """Names of the methods a callback's own class (not ``pl.Callback``) defines, hooks and helpers alike."""
    names = set()
    for cls in type(callback).__mro__:
        if cls in (pl.Callback, object) or not cls.__module__.startswith("lightning_beta"):
            continue
        names.update(n for n, v in vars(cls).items() if callable(v) and not n.startswith("__"))
    return sorted(names)


def arm_inside(callback: pl.Callback, guard: Guard, arm: ArmOnNonLoggingSteps) -> None:
    """Hook mode: arm the guard only while one of ``callback``'s own methods runs during a non-logging batch.

    The instance attributes shadow the class methods, so hooks that the callback registers on the optimizer during
    the fit (a step post hook) are wrapped too.
    """
    depth = [0]
    for name in own_methods(callback):
        method = getattr(callback, name)

        def wrapped(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            outer = depth[0] == 0 and arm.non_logging and not guard.armed
            depth[0] += 1
            if outer:
                guard.arm()
            try:
                return __method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if outer:
                    guard.disarm()

        setattr(callback, name, wrapped)


class HookTimer:
    """Host time and device time (between CUDA events) of a callback's own methods, per optimizer step."""

    def __init__(self, callback: pl.Callback, device: str) -> None:
        self.device = device
        self.host: dict[int, float] = {}
        self.events: dict[int, list[tuple[Any, Any]]] = {}
        self.trainer: pl.Trainer | None = None
        depth = [0]
        for name in own_methods(callback):
            method = getattr(callback, name)

            def timed(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                if depth[0] or self.trainer is None or not self.trainer.training:
                    return __method(*args, **kwargs)
                step = self.trainer.global_step
                depth[0] += 1
                start_event = end_event = None
                if self.device == "cuda":
                    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start_event.record()
                start = time.perf_counter()
                try:
                    return __method(*args, **kwargs)
                finally:
                    self.host[step] = self.host.get(step, 0.0) + time.perf_counter() - start
                    if end_event is not None:
                        end_event.record()
                        self.events.setdefault(step, []).append((start_event, end_event))
                    depth[0] -= 1

            setattr(callback, name, timed)

    def per_step_us(self, first: int, last: int) -> tuple[float, float]:
        """Mean host and device microseconds per optimizer step over steps ``first..last``.

        The mean, not the median: work done every k-th step (a buffer reduced on the device) belongs to the cost.
        """
        synchronize(self.device)
        steps = range(first, last + 1)
        host = statistics.fmean(self.host.get(s, 0.0) for s in steps) * 1e6
        device = 0.0
        if self.device == "cuda":
            device = statistics.fmean(sum(a.elapsed_time(b) for a, b in self.events.get(s, [])) for s in steps) * 1e3
        return host, device


class BindTrainer(pl.Callback):
    def __init__(self, timer: HookTimer) -> None:
        self.timer = timer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.timer.trainer = trainer


# ---------------------------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------------------------

CALLBACK_SETS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": list,
    "BetaMomentumCallback": lambda: [BetaMomentumCallback()],
    "DampingRegimeMonitor": lambda: [DampingRegimeMonitor()],
    "LayerAttributionCallback": lambda: [LayerAttributionCallback(reference_batches=0)],
    "all three": lambda: [
        BetaMomentumCallback(),
        DampingRegimeMonitor(),
        LayerAttributionCallback(reference_batches=0),
    ],
}
OVERHEAD_CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    **CALLBACK_SETS,
    "LearningRateMonitor(log_momentum=True)": lambda: [LearningRateMonitor(log_momentum=True)],
    "grad_norm recipe": lambda: [GradNormRecipe()],
}


def trainer(
    s: Sizes,
    root: Path,
    callbacks: list[pl.Callback],
    precision: str,
    max_steps: int,
    log_every_n_steps: int,
    max_epochs: int = -1,
    benchmark: bool | None = None,
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if s.device == "cuda" else "cpu",
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(root, name="tb"),
        log_every_n_steps=log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        benchmark=s.device == "cuda" if benchmark is None else benchmark,
        num_sanity_val_steps=0,
    )


@dataclass
class SyncResult:
    precision: str
    lr: str
    callbacks: str
    mode: str
    armed_steps: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.armed_steps > 0


SYNC_PRECISIONS = (("32-true", "sgd"), ("bf16-mixed", "sgd"), ("16-mixed", "adam_fused"))


def where(exc: BaseException) -> str:
    """The innermost frame of the exception's traceback outside this script, as ``file:line``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() != Path(__file__)]
    if not frames:
        return "?"
    frame = frames[-1]
    for marker in ("site-packages/", "lightning_beta/"):
        if marker in frame.filename:
            name = (
                frame.filename.split(marker, 1)[1]
                if marker == "site-packages/"
                else "lightning_beta/" + frame.filename.split(marker, 1)[1]
            )
            break
    else:
        name = frame.filename
    return f"{name}:{frame.lineno} ({frame.name})"


def sync_fit(
    s: Sizes, root: Path, precision: str, optimizer: str, tensor_lr: bool, config: str, mode: str
) -> SyncResult:
    guard = Guard(s.device)
    arm = ArmOnNonLoggingSteps(guard, window=mode == "window")
    callbacks = CALLBACK_SETS[config]()
    if mode == "hooks":
        for callback in callbacks:
            arm_inside(callback, guard, arm)
    if tensor_lr:
        # SGD: its foreach step calls lr.item() itself, and its momentum is a Python float. GradScaler needs a fused
        # optimizer to stay on the device; without a GradScaler, a capturable Adam reads every value on the device.
        optimizer = "adam_capturable" if s.device == "cuda" and precision != "16-mixed" else "adam_fused"
    steps, per_epoch = 12, 6
    torch.manual_seed(0)
    task = Task(ResNet18(width=8, classes=10), optimizer, 0.05, tensor_lr, steps)
    x, y = image_batch(s.sync_px, s.sync_batch, s.device)
    result = SyncResult(precision, "tensor" if tensor_lr else "float", config, mode, 0)
    try:
        with guard.installed():
            callbacks = [arm, *callbacks, Disarm(guard, arm)]
            # no cuDNN autotuning: its first-step search is no part of what the callbacks do per step
            fit = trainer(s, root, callbacks, precision, steps, log_every_n_steps=5, benchmark=False)
            fit.fit(task, loader((x, y.remainder(10)), per_epoch))
    except Exception as exc:
        first = arm.exception or exc  # the one raised in the step, not what a teardown raised after it
        result.error = f"{type(first).__name__}: {(str(first).splitlines() or [''])[0][:120]} at {where(first)}"
    result.armed_steps = arm.armed_steps
    return result


def check_syncs(s: Sizes, root: Path) -> list[SyncResult]:
    results = []
    for precision, optimizer in SYNC_PRECISIONS:
        if precision == "bf16-mixed" and s.device == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        for tensor_lr in (False, True):
            bare = sync_fit(s, root, precision, optimizer, tensor_lr, "bare", "window")
            results.append(bare)
            mode = "window" if bare.error is None else "hooks"
            for config in CALLBACK_SETS:
                if config != "bare":
                    results.append(sync_fit(s, root, precision, optimizer, tensor_lr, config, mode))
            print(f"  sync check {precision}, {'tensor' if tensor_lr else 'float'} lr: done", file=sys.stderr)
    return results


def sync_table(results: list[SyncResult]) -> list[str]:
    lines = [
        "| precision | lr | callbacks | guarded | non-logging steps guarded | result |",
        "|---|---|---|---|---:|---|",
    ]
    for r in results:
        mode = "whole batch" if r.mode == "window" else "callbacks' own methods"
        result = "no host sync" if r.ok else (r.error or "no step guarded")
        lines.append(f"| {r.precision} | {r.lr} | {r.callbacks} | {mode} | {r.armed_steps} | {result} |")
    return lines


@dataclass
class Workload:
    name: str
    precision: str
    make: Callable[[int], Task]
    batch: tuple[Tensor, Tensor]
    rows: dict[str, list[float]] = field(default_factory=dict)


def workloads(s: Sizes) -> list[Workload]:
    def resnet(steps: int) -> Task:
        return Task(ResNet18(width=s.resnet_width), "sgd", 0.1, False, steps)

    def gpt(steps: int) -> Task:
        net = GPT(s.gpt_layers, s.gpt_width, s.gpt_heads, s.gpt_vocab, s.gpt_tokens)
        return Task(net, "adamw_fused", 6e-4, False, steps)

    images = image_batch(s.image_px, s.image_batch, s.device)
    tokens = token_batch(s)
    shape = f"{s.image_px} px, batch {s.image_batch}"
    gpt_shape = f"{s.gpt_layers} layers, width {s.gpt_width}, {s.gpt_tokens} tokens, batch {s.gpt_batch}"
    return [
        Workload(f"ResNet-18 shape ({shape}), fp32", "32-true", resnet, images),
        Workload(f"ResNet-18 shape ({shape}), bf16-mixed", "bf16-mixed", resnet, images),
        Workload(f"GPT-2 small shape ({gpt_shape}), bf16-mixed", "bf16-mixed", gpt, tokens),
    ]


def timed_fit(s: Sizes, root: Path, work: Workload, callbacks: list[pl.Callback]) -> float:
    total = s.warmup + s.steps
    timer = StepTimer(s.warmup, s.steps, s.device)
    torch.manual_seed(0)
    with torch.device(s.device):  # built where it trains: a fresh GPT-2 initialises in milliseconds on the GPU
        task = work.make(total)
    trainer(s, root, [*callbacks, timer], work.precision, total, log_every_n_steps=50).fit(
        task, loader(work.batch, total)
    )
    del task
    return timer.ms_per_step


def measure_overhead(s: Sizes, root: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows of the overhead table, and the configurations whose fit raised (``"model / config"`` to the error)."""
    rows, errors = [], {}
    rng = random.Random(0)
    for work in workloads(s):
        ms: dict[str, list[float]] = {c: [] for c in OVERHEAD_CONFIGS}
        ratios: dict[str, list[float]] = {c: [] for c in OVERHEAD_CONFIGS}
        failed: dict[str, str] = {}

        def attempt(
            config: str, callbacks: list[pl.Callback], work: Workload = work, failed: dict[str, str] = failed
        ) -> float | None:
            try:
                return timed_fit(s, root, work, callbacks)
            except Exception as exc:
                failed.setdefault(config, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]}")
                return None

        attempt("bare", [])  # warm-up: allocator, cuDNN autotuning, kernels
        for rep in range(s.repeats):
            order = list(OVERHEAD_CONFIGS)
            rng.shuffle(order)
            this = {c: attempt(c, OVERHEAD_CONFIGS[c]()) for c in order if c not in failed}
            bare = this.get("bare")
            for config, value in this.items():
                if value is not None and bare is not None:
                    ms[config].append(value)
                    ratios[config].append(value / bare)
            print(f"  {work.name}: repetition {rep + 1}/{s.repeats}", file=sys.stderr)
        hooks = {}
        for config in ("BetaMomentumCallback", "DampingRegimeMonitor", "LayerAttributionCallback"):
            (callback,) = CALLBACK_SETS[config]()
            timer = HookTimer(callback, s.device)
            hook_failed: dict[str, str] = {}
            if config not in failed and attempt(config, [BindTrainer(timer), callback], failed=hook_failed) is not None:
                hooks[config] = timer.per_step_us(s.warmup, s.warmup + s.steps - 1)
            for error in hook_failed.values():
                errors[f"{work.name} / {config} (hook timing)"] = error
        bare_ms = statistics.median(ms["bare"]) if ms["bare"] else math.nan
        for config in OVERHEAD_CONFIGS:
            if config in failed or not ratios[config]:
                errors[f"{work.name} / {config}"] = failed.get(config, "no measurement")
                continue
            q = statistics.quantiles(ratios[config], n=4) if len(ratios[config]) > 1 else [ratios[config][0]] * 3
            host, dev = hooks.get(config, (math.nan, math.nan))
            rows.append(
                {
                    "model": work.name,
                    "config": config,
                    "ms": statistics.median(ms[config]),
                    "ratio": statistics.median(ratios[config]),
                    "q1": q[0],
                    "q3": q[2],
                    "bare_ms": bare_ms,
                    "host_us": host,
                    "device_us": dev,
                }
            )
        del work.batch
    return rows, errors


def overhead_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | configuration | ms/step (median) | ratio to bare (median) | IQR of ratio | hook host time"
        " | hook device time | hook share of the bare step |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        hooked = not math.isnan(r["host_us"])
        host = f"{r['host_us']:.0f} us" if hooked else ""
        dev = f"{r['device_us']:.0f} us" if hooked and r["device_us"] else ""
        share = f"{max(r['host_us'], r['device_us']) / (10 * r['bare_ms']):.2f}%" if hooked else ""
        lines.append(
            f"| {r['model']} | {r['config']} | {r['ms']:.2f} | {r['ratio']:.3f} | [{r['q1']:.3f}, {r['q3']:.3f}]"
            f" | {host} | {dev} | {share} |"
        )
    return lines


def targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        if "LayerAttributionCallback" in by and not math.isnan(by["LayerAttributionCallback"]["host_us"]):
            att = by["LayerAttributionCallback"]
            share = max(att["host_us"], att["device_us"]) / (1000 * att["bare_ms"])
            fit_share = att["ratio"] - 1
            lines.append(
                f"- {model}: LayerAttributionCallback's own methods take {share:.2%} of the bare step and its whole"
                f" fit adds {fit_share:+.2%} (ratio IQR [{att['q1']:.3f}, {att['q3']:.3f}]; target: its methods"
                f" <= 0.3% of the step,"
                f" {'met' if share <= 0.003 else 'not met'})."
            )
        if "all three" in by and "grad_norm recipe" in by:
            ours, recipe = by["all three"]["ratio"] - 1, by["grad_norm recipe"]["ratio"] - 1
            factor = f"{recipe / ours:.1f}x ours" if ours > 0 else "not comparable (ours <= 0, within the noise)"
            lines.append(
                f"- {model}: all three add {ours:+.2%}, the grad_norm recipe {recipe:+.2%}: {factor}"
                f" (target >= 9x: {'met' if ours * 9 <= recipe else 'not met'})."
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Tests and demo (subprocesses)
# ---------------------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if "mark.gpu" in path.read_text(encoding="utf-8"):
            files.append(str(path.relative_to(ROOT)))
    return files


def run(cmd: list[str], timeout: float) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return 124, f"timed out after {timeout:.0f} s\n{out}"
    return done.returncode, done.stdout + done.stderr


def run_gpu_tests() -> tuple[bool, str]:
    files = gpu_test_files()
    if not files:
        return True, "no test file carries the gpu marker"
    rc, out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files], 300)
    summary = [line for line in out.splitlines() if line.strip()][-1:] or [""]
    print(out[-3000:], file=sys.stderr)
    return rc in (0, 5), f"`pytest -m gpu {' '.join(files)}`: {summary[0].strip('= ')} (exit code {rc})"


def run_demo(s: Sizes, root: Path) -> tuple[bool, str]:
    accelerator = "gpu" if s.device == "cuda" else "cpu"
    extra = ["--epochs", "1"] if s.device == "cpu" else []  # the dry run only shows that the command works
    args = ["demo", "--quick", *extra, "--accelerator", accelerator]
    started = time.perf_counter()
    timeout = 300 if s.device == "cuda" else 900  # a shared CPU can be slow; the GPU run must fit its budget
    rc, out = run([sys.executable, "-m", "lightning_beta", *args, "--out", str(root / "demo")], timeout)
    print(out[-3000:], file=sys.stderr)
    took = time.perf_counter() - started
    return rc == 0, f"`python -m lightning_beta {' '.join(args)}`: exit code {rc}, {took:.0f} s"


# ---------------------------------------------------------------------------------------------------------------


def device_name(s: Sizes) -> str:
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU only (dry run): {cpu_model()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU at tiny sizes")
    parser.add_argument(
        "--results", type=Path, help="file to write the GPU section to (default: benchmarks/RESULTS.md)"
    )
    parser.add_argument("--no-write", action="store_true", help="write no results file")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "syncs", "overhead", "demo"])
    parser.add_argument("--repeats", type=int, help="interleaved repetitions of the overhead fits")
    args = parser.parse_args(argv)
    s = DRY if args.dry_run else REAL
    if args.repeats:
        s = Sizes(**{**s.__dict__, "repeats": args.repeats})
    if s.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if s.device == "cpu":
        torch.set_num_threads(1)
    started = time.perf_counter()
    failures: list[str] = []
    body = [
        "## GPU" + (" (dry run on the CPU)" if args.dry_run else ""),
        "",
        f"- Command: `python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Device: {device_name(s)}",
        f"- Versions: torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "tests" not in args.skip:
            ok, line = run_gpu_tests()
            body += ["### Tests marked gpu", "", f"- {line}", ""]
            if not ok:
                failures.append("gpu tests")
            print(line)
        if "syncs" not in args.skip:
            results = check_syncs(s, root)
            how = (
                '`torch.cuda.set_sync_debug_mode("error")`'
                if s.device == "cuda"
                else "Tensor host-copy methods (" + ", ".join(GUARDED_METHODS) + ") made to raise"
            )
            table = sync_table(results)
            body += [
                "### Host syncs on non-logging steps",
                "",
                f"Guard: {how}, armed from `on_train_batch_start` to `on_train_batch_end` of every batch on which"
                " Lightning does not log (`log_every_n_steps=5`, 12 steps, 2 epochs), unless the bare fit itself"
                " synced, in which case only the callbacks' own methods are guarded for that combination.",
                "",
                *table,
                "",
            ]
            print("\n".join(table))
            bad = [r for r in results if not r.ok and r.callbacks != "bare"]
            if bad:
                failures.append(f"{len(bad)} host-sync check(s)")
        if "overhead" not in args.skip:
            rows, errors = measure_overhead(s, root)
            table = overhead_table(rows)
            if errors:
                failures.append(f"{len(errors)} overhead fit(s)")
                table += ["", *(f"- {name}: failed ({error})" for name, error in errors.items())]
            body += [
                "### Overhead",
                "",
                *table,
                "",
                *targets(rows),
                "",
                f"{s.repeats} interleaved repetitions of {s.steps} timed steps after {s.warmup} warm-up steps per"
                " configuration, the batch already on the device, TensorBoard logger with `log_every_n_steps=50`;"
                " ratios are medians over repetitions of the ratio to the bare fit of the same repetition.",
                "",
            ]
            print("\n".join(table))
            print("\n".join(targets(rows)))
        if "demo" not in args.skip:
            ok, line = run_demo(s, root)
            body += ["### Demo", "", f"- {line}", ""]
            if not ok:
                failures.append("demo")
            print(line)
    body.append(
        f"Run time: {time.perf_counter() - started:.0f} s." + (f" Failed: {', '.join(failures)}." if failures else "")
    )
    path = args.results or (None if args.dry_run else RESULTS)
    if path is not None and not args.no_write:
        write_section("\n".join(body), path)
        print(f"wrote the GPU section to {path}")
    print(
        f"done in {time.perf_counter() - started:.0f} s; "
        + (f"FAILED: {', '.join(failures)}" if failures else "all checks passed")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
