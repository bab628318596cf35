"""One class per fine-tuning method: what it trains, the loss of a micro-batch, its evaluation.

Each takes the encoded train and held-out splits (`data.Split`) and exposes `module` (what the
optimiser and DDP see), `loss(model, indices)` and `evaluate(model)`, so the loop is one loop.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gristmill.model.finetune.data import Rows, Split
from gristmill.model.finetune.objectives import Classifier, dpo_loss, sequence_logps, sft_loss, unwrap
from gristmill.model.model import Transformer


def batch_tensors(rows: Rows, lengths: np.ndarray, indices: np.ndarray, device: torch.device):
    """x, y, document_ids of the chosen rows, cut to the longest of them (padding costs time)."""
    width = int(lengths[indices].max())
    x = torch.from_numpy(rows.x[indices, :width]).to(device)
    y = torch.from_numpy(rows.y[indices, :width]).to(device)
    docs = None if rows.document_ids is None else torch.from_numpy(rows.document_ids[indices, :width]).to(device)
    return x, y, docs


EVAL_ROWS = 32  # rows per forward when nothing is trained (evaluation, the DPO reference)


def chunks(n: int, size: int = EVAL_ROWS):
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


class SFT:
    """Next-token loss on assistant tokens, examples packed several to a row."""

    def __init__(self, net: Transformer, train: Split, holdout: Split, device: torch.device):
        self.module, self.net, self.train, self.holdout = net, net, train, holdout
        self.device = device

    def loss(self, model: nn.Module, indices: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return sft_loss(model, *batch_tensors(self.train.rows, self.train.lengths, indices, self.device)), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out loss per assistant token."""
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        for indices in chunks(len(self.holdout.rows)):
            x, y, docs = batch_tensors(self.holdout.rows, self.holdout.lengths, indices, self.device)
            scored = int((y != -1).sum())
            total += sft_loss(model, x, y, docs).item() * scored
            count += scored
        model.train(was_training)
        return {"val_loss": total / count} if count else {}


class DPO:
    """DPO on (chosen, rejected) replies; the reference is the input model, frozen: its
    log-probabilities are computed once, before the first step."""

    def __init__(self, net: Transformer, train: Split, holdout: Split, device: torch.device, beta: float):
        self.module, self.net, self.train, self.holdout = net, net, train, holdout
        self.device, self.beta = device, beta
        self.reference = {name: self.split_logps(net, split) for name, split in (("train", train), ("holdout", holdout))}

    @torch.no_grad()
    def split_logps(self, model: nn.Module, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for indices in chunks(len(split.rows)):
            c, r = self.pair_logps(model, split, indices)
            chosen.append(c)
            rejected.append(r)
        model.train(was_training)
        empty = torch.zeros(0, device=self.device)
        return torch.cat(chosen) if chosen else empty, torch.cat(rejected) if rejected else empty

    def pair_logps(self, model: nn.Module, split: Split, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-likelihoods in one forward (2B rows)."""
        cx, cy, _ = batch_tensors(split.chosen_rows, split.lengths, indices, self.device)
        rx, ry, _ = batch_tensors(split.rows, split.lengths, indices, self.device)
        logps = sequence_logps(model, self.net, torch.cat([cx, rx]), torch.cat([cy, ry]))
        return logps[: len(indices)], logps[len(indices) :]

    def loss(self, model: nn.Module, indices: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.pair_logps(model, self.train, indices)
        ref_chosen, ref_rejected = (t[torch.from_numpy(indices).to(self.device)] for t in self.reference["train"])
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out DPO loss, reward accuracy and margins."""
        if not len(self.holdout.rows):
            return {}
        chosen, rejected = self.split_logps(model, self.holdout)
        loss, metrics = dpo_loss(chosen, rejected, *self.reference["holdout"], self.beta)
        return {"val_loss": loss.item()} | {f"val_{k}": v.item() for k, v in metrics.items()}


class Classify:
    """A linear head on the pooled hidden states, trained together with the whole model."""

    def __init__(self, net: Transformer, train: Split, holdout: Split, device: torch.device,
                 labels: list[str], pooling: str):
        self.net, self.train, self.holdout = net, train, holdout
        self.device, self.labels = device, labels
        self.module = Classifier(net, len(labels), pooling).to(device)

    def logits(self, model: nn.Module, split: Split, indices: np.ndarray) -> torch.Tensor:
        x, _, _ = batch_tensors(split.rows, split.lengths, indices, self.device)
        return model(x, torch.from_numpy(split.lengths[indices]).to(self.device))

    def loss(self, model: nn.Module, indices: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.logits(model, self.train, indices)
        target = torch.from_numpy(self.train.labels[indices]).to(self.device)
        return F.cross_entropy(logits, target), {"accuracy": (logits.argmax(-1) == target).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, object]:
        """Held-out accuracy, the majority-class baseline, and the confusion matrix (rows: true label)."""
        n = len(self.holdout.rows)
        if not n:
            return {}
        was_training = model.training
        model.eval()
        predicted = torch.cat([self.logits(model, self.holdout, i).argmax(-1).cpu() for i in chunks(n)])
        model.train(was_training)
        truth = torch.from_numpy(self.holdout.labels)
        confusion = torch.zeros(len(self.labels), len(self.labels), dtype=torch.long)
        confusion.index_put_((truth, predicted), torch.ones(n, dtype=torch.long), accumulate=True)
        majority = np.bincount(self.train.labels, minlength=len(self.labels)).argmax()
        return {
            "val_accuracy": (predicted == truth).float().mean().item(),
            "val_majority_accuracy": float((self.holdout.labels == majority).mean()),
            "val_confusion": confusion.tolist(),
        }


def classifier_head(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The classification head's weights, for the checkpoint (None for sft and dpo)."""
    module = unwrap(module)
    return module.head.state_dict() if isinstance(module, Classifier) else None
