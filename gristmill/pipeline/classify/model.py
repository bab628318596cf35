"""The fastText quality classifier: train it from positive and negative texts with a held-out
split, load one trained elsewhere, and score many documents in one call.

A document's score is the model's probability of the positive label (`__label__hq`, or the label
named by `positive_label` for a model trained elsewhere), in [0, 1]. Texts are scored on one line
(newlines become spaces; fastText splits words on any whitespace).
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

LABEL_PREFIX = "__label__"
POSITIVE = "hq"
NEGATIVE = "lq"
MODEL_FILE = "quality_model.bin"


class FastTextSettings(BaseModel):
    """fastText's supervised settings. Word bigrams let the model see word order (shuffled text
    has the right words in the wrong order); one thread keeps training reproducible."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(20, ge=1)
    lr: float = Field(0.5, gt=0)
    dim: int = Field(32, ge=1)
    word_ngrams: int = Field(2, ge=1)
    minn: int = Field(0, ge=0)
    maxn: int = Field(0, ge=0)
    min_count: int = Field(1, ge=1)
    seed: int = 0
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    max_examples: int | None = Field(100_000, ge=1)  # per side, a fixed random sample beyond this


def require_fasttext() -> None:
    if importlib.util.find_spec("fasttext") is None:
        raise ValueError("the classify stage needs the package `fasttext`: pip install 'gristmill[fasttext]'")


@dataclass
class Trained:
    path: Path
    metrics: dict


def _sample(texts: list[str], limit: int | None, rng: random.Random) -> list[str]:
    return texts if limit is None or len(texts) <= limit else rng.sample(texts, limit)


def train_classifier(positives: list[str], negatives: list[str], settings: FastTextSettings, folder: Path) -> Trained:
    """Train on a random (1 - holdout_fraction) of each side, measure on the rest, save the model."""
    require_fasttext()
    import fasttext

    if not positives or not negatives:
        raise ValueError(f"training needs examples on both sides: {len(positives)} positives, {len(negatives)} negatives")
    rng = random.Random(settings.seed)
    labelled = [(POSITIVE, t) for t in _sample(positives, settings.max_examples, rng)]
    labelled += [(NEGATIVE, t) for t in _sample(negatives, settings.max_examples, rng)]
    rng.shuffle(labelled)
    n_holdout = int(len(labelled) * settings.holdout_fraction)
    holdout, train = labelled[:n_holdout], labelled[n_holdout:]
    folder.mkdir(parents=True, exist_ok=True)
    train_file = folder / "_train.txt"
    train_file.write_text("".join(f"{LABEL_PREFIX}{label} {text}\n" for label, text in train))
    model = fasttext.train_supervised(
        str(train_file), epoch=settings.epoch, lr=settings.lr, dim=settings.dim, wordNgrams=settings.word_ngrams,
        minn=settings.minn, maxn=settings.maxn, minCount=settings.min_count, seed=settings.seed, thread=1, verbose=0,
    )
    train_file.unlink()
    path = folder / MODEL_FILE
    model.save_model(str(path))
    metrics = {"train_examples": len(train), "holdout_examples": len(holdout),
               "positives": sum(label == POSITIVE for label, _ in labelled),
               "negatives": sum(label == NEGATIVE for label, _ in labelled)}
    if holdout:
        scores = score_texts(model, [t for _, t in holdout], POSITIVE)
        truth = np.array([label == POSITIVE for label, _ in holdout])
        metrics.update(holdout_metrics(truth, scores >= 0.5))
    return Trained(path, metrics)


def holdout_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, and precision / recall of the positive label."""
    true_pos = int((truth & predicted).sum())
    return {
        "accuracy": float((truth == predicted).mean()),
        "precision": true_pos / int(predicted.sum()) if predicted.any() else 0.0,
        "recall": true_pos / int(truth.sum()) if truth.any() else 0.0,
    }


def load_classifier(path: str | Path, positive_label: str = POSITIVE):
    """A fastText model from a file; fails naming the file when it is missing or lacks the label."""
    require_fasttext()
    import fasttext

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such fastText model file")
    try:
        model = fasttext.load_model(str(path))
    except ValueError as error:
        raise ValueError(f"{path}: not a fastText model file ({error})") from None
    if LABEL_PREFIX + positive_label not in model.labels:
        raise ValueError(f"{path}: the model has no label {positive_label!r} (labels: {model.labels})")
    return model


def score_texts(model, texts: list[str] | pa.Array, positive_label: str = POSITIVE) -> np.ndarray:
    """The positive label's probability for every text (float32), in one call into fastText."""
    if len(texts) == 0:
        return np.zeros(0, dtype=np.float32)
    column = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    lines = pc.replace_substring(column, "\n", " ").to_pylist()
    labels, probs = model.predict(lines, k=-1, threshold=0.0)
    wanted = LABEL_PREFIX + positive_label
    return np.array([p[list(ls).index(wanted)] if wanted in ls else 0.0 for ls, p in zip(labels, probs)],
                    dtype=np.float32)
