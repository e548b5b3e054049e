"""A small causal language model with all three callbacks, then diagnosed token by token.

A GPT-2 from a tiny Hugging Face ``transformers`` config (random init, nothing downloaded) learns a toy grammar
the script generates: each sequence opens with a rule token ``r`` in ``0..3`` and then counts through the 60 value
tokens ``4..63`` in steps of ``r + 1`` (wrapping around), so every token after the second is determined by the
rule and the token before it. AdamW trains it for a few dozen steps with

- ``BetaMomentumCallback``: ``beta1`` from the live learning rate (critical damping),
- ``DampingRegimeMonitor``: the damping ratio and regime of each param group,
- ``LayerAttributionCallback``: the gradient norm of each layer group (the embeddings, each block, the final
  norm: ``group_by="auto"`` follows GPT-2's own structure; ``lm_head`` shares the embedding's tensor),

and ``lightning_beta.diagnosis`` then scores the layer groups on the validation tokens the model gets wrong
(:func:`~lightning_beta.diagnosis.attribute_errors`, one element per token) and runs the whole
localize-treat-verify pipeline (:func:`~lightning_beta.diagnosis.diagnose`).

Run: ``python examples/07_transformer_lm.py [--steps N] [--out DIR]``, then ``tensorboard --logdir DIR``.
Needs ``transformers``; runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_beta import BetaMomentumCallback, DampingRegimeMonitor, LayerAttributionCallback
from lightning_beta.diagnosis import attribute_errors, diagnose, load_attribution
from lightning_beta.layer_groups import group_parameters, shared_parameters

N_RULES, N_VALUES = 4, 60
VOCAB = N_RULES + N_VALUES


def toy_grammar(n: int, length: int = 25, seed: int = 0) -> Tensor:
    """``n`` sequences of ``length`` tokens: a rule token ``r``, then values counting in steps of ``r + 1``."""
    gen = torch.Generator().manual_seed(seed)
    rules = torch.randint(0, N_RULES, (n, 1), generator=gen)
    start = torch.randint(0, N_VALUES, (n, 1), generator=gen)
    values = (start + (rules + 1) * torch.arange(length - 1)) % N_VALUES + N_RULES
    return torch.cat([rules, values], dim=1)


def next_token_loader(sequences: Tensor, batch_size: int, shuffle: bool = False) -> DataLoader:
    """``(inputs, targets)`` batches: every token predicts the one after it."""
    data = TensorDataset(sequences[:, :-1], sequences[:, 1:])
    gen = torch.Generator().manual_seed(0)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class CausalLM(pl.LightningModule):
    """A causal LM around a Hugging Face model; AdamW with a warm-up then cosine learning rate."""

    def __init__(self, lr: float = 5e-3) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_gpt2()

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids).logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=total, pct_start=0.2, cycle_momentum=False
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def token_accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Share of the determined tokens (after the first two) predicted right."""
    was_training = model.training
    model.eval()
    right = total = 0
    for x, y in loader:
        hit = model(x).logits.argmax(-1)[:, 1:] == y[:, 1:]
        right, total = right + int(hit.sum()), total + hit.numel()
    model.train(was_training)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps. Defaults to 64.")
    parser.add_argument("--out", default="lightning_beta_runs", help="log directory. Defaults to lightning_beta_runs.")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # a tiny model: more threads only add contention
    start = time.perf_counter()

    train = next_token_loader(toy_grammar(512, seed=0), batch_size=32, shuffle=True)
    val = next_token_loader(toy_grammar(128, seed=1), batch_size=64)
    lm = CausalLM()
    groups = group_parameters(lm)
    print("layer groups:", list(groups))
    for tie in shared_parameters(lm, groups):
        print(f"tied: {tie.name} (group {tie.group}) is also {', '.join(tie.also)}")

    beta = BetaMomentumCallback()
    monitor = DampingRegimeMonitor(curvature="secant")  # per layer group, by the same groups as the attribution
    attribution = LayerAttributionCallback(reference_batches=2)
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=TensorBoardLogger(args.out, name="07_transformer_lm"),
        callbacks=[beta, monitor, attribution],
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    before = token_accuracy(lm.model, val)
    trainer.fit(lm, train)
    after = token_accuracy(lm.model, val)
    print(f"trained {trainer.global_step} optimizer steps: token accuracy {before:.3f} -> {after:.3f}")
    print(f"final train_loss {float(trainer.callback_metrics['train_loss']):.3f}")
    adam_beta1 = trainer.optimizers[0].param_groups[0]["betas"][0]
    print(f"final beta1 {adam_beta1:.3f} at lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")

    print("\n## Damping regimes")
    print(monitor.summary())
    curvature = monitor.layer_curvature()
    print("secant curvature by layer group:", ", ".join(f"{g} {c:.3g}" for g, c in curvature.items()))

    assert attribution.artifact_path is not None, "the artifact is written at the end of training"
    artifact = load_attribution(attribution.artifact_path)
    print("\n## Gradient norm by layer group")
    print(f"artifact: {attribution.artifact_path} ({artifact.total.count} optimizer steps)")
    print("ranking by size-normalised norm:", " > ".join(name for name, _ in artifact.ranking()))

    print("\n## Token-level diagnosis")
    net = lm.model
    scores = attribute_errors(net, val)
    print(f"misclassified tokens: {scores.n_misclassified} of {scores.n_samples}")
    print(scores)
    report = diagnose(
        net, train, val, localizer="gradient", top_k=1, max_epochs=1, lr=1e-3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    print(report.to_markdown())
    print(f"flagged: {report.flagged}")
    print(f"took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
