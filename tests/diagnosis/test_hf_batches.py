"""The diagnosis on Hugging Face models and dict batches: tiny models, random init, nothing downloaded.

A Hugging Face batch is a dict holding its targets under ``labels``; the diagnosis passes the whole dict (labels
included) as keyword arguments and reads ``output.logits``. Every result is compared with a recomputation that
calls the model directly.
"""

import copy
import logging
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_beta.callbacks import LayerAttributionCallback
from lightning_beta.diagnosis import (
    activation_drift,
    attribute_errors,
    diagnose,
    kinetic_energy_probe,
    surgical_correction,
    verify,
)
from lightning_beta.diagnosis._batches import iter_batches, split_batch
from lightning_beta.diagnosis.repair import holdout_scores, split_holdout
from lightning_beta.diagnosis.shift import auto_rgn, recommend_groups
from lightning_beta.layer_groups import group_parameters
from tests.helpers import trainer_kwargs

transformers = pytest.importorskip("transformers")

VOCAB, CLASSES, T = 64, 3, 12


def bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _padded(gen, shortest):
    """Token ids of a random length in ``[shortest, T]``, padded with 0 at the end, and their attention mask."""
    ids = torch.randint(1, VOCAB, (T,), generator=gen)
    length = int(torch.randint(shortest, T + 1, (), generator=gen))
    mask = (torch.arange(T) < length).long()
    return ids * mask, mask


def classification_samples(n=48, seed=0):
    """A list of per-sample dicts, the shape of a tokenized Hugging Face dataset (padding at the end)."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids, mask = _padded(gen, 4)
        label = int(ids[0]) % CLASSES  # learnable from the first token
        samples.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(label)})
    return samples


def lm_samples(n=32, seed=0):
    """Causal-LM samples: ``labels`` is ``input_ids`` with -100 on padding and on the first token."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        ids, mask = _padded(gen, 5)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[0] = -100  # the first token is predicted from nothing
        samples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return samples


def shifted_loss(logits, targets):
    """Element t is token t predicted from the logits at t - 1 (the default loss does not shift)."""
    losses = torch.zeros(targets.shape, dtype=logits.dtype, device=logits.device)
    losses[:, 1:] = nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets[:, 1:], reduction="none", ignore_index=-100
    )
    return losses


def shifted_predict(logits):
    preds = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    preds[:, 1:] = logits[:, :-1].argmax(-1)
    return preds


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_split_batch_keeps_the_old_kinds_and_takes_hugging_face_dicts():
    x, y = torch.ones(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y))[0] is x and split_batch([x, y, "meta"])[1] is y
    assert split_batch({"x": x, "y": y, "labels": y})[0] is x  # the {"x", "y"} rule is tried first
    batch = {"input_ids": x.long(), "labels": y}
    inputs, targets = split_batch(batch)
    assert inputs is batch and targets is y
    with pytest.raises(TypeError, match=r"a dict with 'x' and 'y', or a Hugging Face dict with 'labels', got dict"):
        split_batch({"input_ids": x})
    with pytest.raises(TypeError, match="under 'labels' as a tensor, got list"):
        split_batch({"input_ids": x, "labels": [0, 1]})
    moved = list(iter_batches([batch], torch.device("cpu")))
    assert torch.equal(moved[0][0]["input_ids"], batch["input_ids"]) and torch.equal(moved[0][1], y)


def test_gradient_scores_equal_a_per_group_recomputation_on_one_batch():
    net = bert()
    batch = next(iter(DataLoader(classification_samples(16), batch_size=16)))
    scores = attribute_errors(net, [batch])
    net.eval()
    logits = net(**model_inputs(batch)).logits
    wrong = logits.argmax(-1) != batch["labels"]
    assert 0 < int(wrong.sum()) < 16 and scores.n_misclassified == int(wrong.sum()) and scores.n_samples == 16
    loss = nn.functional.cross_entropy(logits[wrong], batch["labels"][wrong])
    names, params = zip(*net.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))
    groups = group_parameters(net)
    assert list(scores.scores) == list(groups)
    for group, members in groups.items():
        flat = [grads[p].flatten() for p in members if grads[p] is not None]
        norm = torch.linalg.vector_norm(torch.cat(flat)).item() if flat else 0.0
        size = sum(dict(net.named_parameters())[p].numel() for p in members)
        assert scores.scores[group] == pytest.approx(norm / math.sqrt(size), rel=1e-4), group


def test_diagnose_a_bert_classifier_on_dict_batches(tmp_path):
    net = bert()
    train = DataLoader(classification_samples(48), batch_size=8)
    val = DataLoader(classification_samples(24, seed=1), batch_size=8)
    before = copy.deepcopy(net.state_dict())
    report = diagnose(net, train, val, localizer="gradient", top_k=1, lr=0.1, **quiet(tmp_path))
    assert report.flagged and report.surgery.optimizer_steps == 6
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])  # the input model is untouched
    # Verification counts against the argmax of each model called directly.
    treated = report.surgery.model
    net.eval()
    treated.eval()
    right_b, right_a = [], []
    with torch.no_grad():
        for batch in val:
            y = batch["labels"]
            right_b.append(net(**model_inputs(batch)).logits.argmax(-1) == y)
            right_a.append(treated(**model_inputs(batch)).logits.argmax(-1) == y)
    rb, ra = torch.cat(right_b), torch.cat(right_a)
    v = report.verification
    assert (v.n_samples, v.fixed, v.broken) == (24, int((~rb & ra).sum()), int((rb & ~ra).sum()))
    assert v.accuracy_before == pytest.approx(rb.float().mean().item())
    assert v.accuracy_after == pytest.approx(ra.float().mean().item())


def quiet(tmp_path):
    kwargs = trainer_kwargs(tmp_path)
    for key in ("max_epochs", "limit_train_batches"):
        kwargs.pop(key)
    return kwargs


def test_causal_lm_counts_tokens_and_ignores_padding(tmp_path):
    net = gpt2()
    samples = lm_samples(32)
    data = DataLoader(samples, batch_size=8)
    n_tokens = sum(int((s["labels"] != -100).sum()) for s in samples)
    scores = attribute_errors(net, data, loss_fn=shifted_loss, predict=shifted_predict)
    assert scores.n_samples == n_tokens and 0 < scores.n_misclassified <= n_tokens
    # The held-out scores against the model's own shifted loss (Hugging Face shifts inside when given labels).
    loss, accuracy = holdout_scores(net, DataLoader(samples, batch_size=32), shifted_loss, shifted_predict)
    net.eval()
    with torch.no_grad():
        batch = next(iter(DataLoader(samples, batch_size=32)))
        out = net(**batch)  # labels given: the model computes the mean token loss itself
        hits = (out.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & (batch["labels"][:, 1:] != -100)
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    assert accuracy == pytest.approx(int(hits.sum()) / n_tokens)
    # verify and the kinetic probe take the same batches; a model compared with itself changes nothing.
    v = verify(net, copy.deepcopy(net), data, predict=shifted_predict)
    assert (v.n_samples, v.fixed, v.broken) == (n_tokens, 0, 0)
    assert list(kinetic_energy_probe(net, data, steps=2, loss_fn=shifted_loss).scores) == list(group_parameters(net))


def test_search_repair_splits_a_dataset_of_dicts(tmp_path):
    samples = lm_samples(40)
    data = DataLoader(samples, batch_size=8)
    fit, held = split_holdout(data, 0.2)
    assert len(fit.dataset) == 32 and len(held.dataset) == 8
    assert set(next(iter(held))) == {"input_ids", "attention_mask", "labels"}  # a Subset of dicts collates to a dict
    net = gpt2()
    result = surgical_correction(
        net, ["transformer.h.1"], data, policy="search", full_steps=100, loss_fn=shifted_loss,
        predict=shifted_predict, **quiet(tmp_path),
    )  # fmt: skip
    assert 0 < result.optimizer_steps <= result.budget_steps == 30
    assert result.groups_touched[0] == "transformer.h.1"
    after = dict(result.model.named_parameters())
    for group, members in group_parameters(net).items():  # the groups left out keep their weights
        if group not in result.groups_touched:
            assert all(torch.equal(dict(net.named_parameters())[p], after[p]) for p in members), group


def test_parameter_selection_and_shift_tools_take_dict_batches(tmp_path):
    net = bert()
    data = DataLoader(classification_samples(32), batch_size=8)
    result = surgical_correction(net, ["classifier"], data, selection="parameters", **quiet(tmp_path))
    assert result.n_params_trained == sum(p.numel() for p in net.classifier.parameters())
    batches = list(data)
    rec = recommend_groups(net, batches, max_candidates=2, probe_steps=2)
    assert rec.groups[0] in group_parameters(net) and rec.optimizer_steps == 4
    tuned = auto_rgn(net, batches, steps=2)
    assert tuned.optimizer_steps == 2 and max(tuned.multipliers.values()) == pytest.approx(1.0)


class Lit(pl.LightningModule):
    """The usual wrapper: the network as ``self.model``, no ``forward``."""

    def __init__(self):
        super().__init__()
        self.model = bert()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_reference_recorded_on_a_wrapper_matches_the_inner_model(tmp_path):
    lit = Lit()
    data = DataLoader(classification_samples(32), batch_size=8)
    callback = LayerAttributionCallback(reference_batches=4, reference_forward=lambda m, b: m.model(**b))
    pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path)).fit(lit, data)
    artifact = callback.artifact
    inner = list(group_parameters(lit.model))
    assert list(artifact.groups) == [f"model.{g}" for g in inner] and set(artifact.reference) == set(artifact.groups)
    bad = copy.deepcopy(lit.model)
    with torch.no_grad():
        bad.classifier.weight.mul_(-4.0)  # a post-LayerNorm block would hide a scaled weight from the drift
    scores = activation_drift(bad, data, artifact)
    assert list(scores.scores) == inner and scores.ranking[0] == "classifier"
    assert "prefix 'model.'" in scores.message
    # The same drift as with a reference renamed by hand.
    renamed = {name.removeprefix("model."): stats for name, stats in artifact.reference.items()}
    assert activation_drift(bad, data, renamed).scores == pytest.approx(scores.scores)
    report = diagnose(bad, data, data, reference=artifact, localizer="drift", top_k=1, **quiet(tmp_path))
    assert report.flagged == ["classifier"] and report.surgery.layers == ["classifier"]
    with pytest.raises(ValueError, match=r"the recorded groups are \['other.a'\], the model's groups are \['bert"):
        activation_drift(bad, data, {"other.a": artifact.reference["model.classifier"]})


def test_internal_fits_print_none_of_lightnings_noise(tmp_path, capsys, caplog):
    net = bert()
    data = DataLoader(classification_samples(32), batch_size=8)
    levels = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")}

    class Ours(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            warnings.warn("a warning of the user's own callback", stacklevel=2)

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        surgical_correction(net, ["classifier"], data, callbacks=[Ours()], accelerator="cpu")
        surgical_correction(net, ["classifier"], data, policy="search", full_steps=40, accelerator="cpu")
    out = capsys.readouterr()
    printed = out.out + out.err + caplog.text
    for noise in ("GPU available", "TPU available", "litlogger", "litmodels", "Trainer.fit` stopped", "| Name"):
        assert noise not in printed
    messages = [str(w.message) for w in caught]
    assert not any("val_dataloader" in m or "eval mode" in m or "LeafSpec" in m for m in messages), messages
    assert "a warning of the user's own callback" in messages  # only Lightning's own noise is silenced
    assert {name: logging.getLogger(name).level for name in levels} == levels  # restored after the fits
    # Outside the internal fit, Lightning speaks as usual.
    with caplog.at_level(logging.INFO):
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=1)
    assert "GPU available" in caplog.text
