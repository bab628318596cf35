"""The `classify` stage: score every document with a fastText quality classifier, keep the best.

Steps:
1. model: train one from `positives` and `negatives` (stages or files; a held-out split measures
   it, see `model.py`), or load the file named by `model`;
2. score (map): every input part's documents are scored on the cluster and the scores written to
   `scores/part-NNNNN.npy`;
3. cut: `threshold` keeps scores >= it; `keep_fraction` finds the global cut from the score files
   alone (the k-th largest of all scores; ties at the cut are kept in part order until exactly
   round(keep_fraction * documents) are kept), so no process ever holds the documents;
4. split (map): each part is written to `kept/` and `removed/` with a `quality_score` column;
   a removed document's reason is `classify:low_score`, or `classify:missing_text` when it has no text.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from gristmill.pipeline import io
from gristmill.pipeline.classify.examples import read_examples
from gristmill.pipeline.classify.model import (
    POSITIVE,
    FastTextSettings,
    load_classifier,
    require_fasttext,
    score_texts,
    train_classifier,
)
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage

SCORE_COLUMN = "quality_score"
SCORES_DIR = "scores"
LOW_SCORE = "classify:low_score"
MISSING_TEXT = "classify:missing_text"
HISTOGRAM_EDGES = [round(0.05 * i, 2) for i in range(21)]
DEFAULT_THRESHOLD = 0.5


class ClassifyConfig(StageConfig):
    """`input`: the documents to score. Either `positives` and `negatives` (each one or more stages
    or files) to train a classifier, or `model`, a fastText file trained elsewhere whose label
    `positive_label` marks good documents. Keep by `threshold` (default 0.5) or `keep_fraction`."""

    positives: list[str] = []
    negatives: list[str] = []
    model: str | None = None
    positive_label: str = POSITIVE
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    keep_fraction: float | None = Field(None, ge=0.0, le=1.0)
    fasttext: FastTextSettings = FastTextSettings()

    @model_validator(mode="before")
    @classmethod
    def _examples_one_or_many(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("positives", "negatives"):
                if isinstance(values.get(key), str):
                    values = {**values, key: [values[key]]}
        return values

    @model_validator(mode="after")
    def _one_way_each(self) -> ClassifyConfig:
        if self.model is not None and (self.positives or self.negatives):
            raise ValueError("give either `model` or `positives` and `negatives`, not both")
        if self.model is None and not (self.positives and self.negatives):
            raise ValueError("give `positives` and `negatives` (stages or files) to train on, or a `model` file")
        if self.threshold is not None and self.keep_fraction is not None:
            raise ValueError("give `threshold` or `keep_fraction`, not both")
        return self

    def references(self) -> list[str]:
        return [*self.input, *self.positives, *self.negatives, *([self.model] if self.model else [])]


def _classifier(path: str, positive_label: str):
    """The model at `path`, loaded once per worker process and again when the file changes
    (a retrained model is saved under the same name)."""
    file = Path(path)
    stat = file.stat() if file.is_file() else None
    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size) if stat else None  # a rewrite is a new inode
    return _cached_classifier(path, positive_label, version)


@functools.lru_cache(maxsize=2)
def _cached_classifier(path: str, positive_label: str, version: tuple[int, int, int] | None):
    return load_classifier(path, positive_label)


def score_part(item: tuple[int, str], model_path: str, positive_label: str, scores_dir: str) -> int:
    """Score one input part and save its scores (NaN for a document without text); returns rows."""
    index, path = item
    text = pq.read_table(path, columns=["text"]).column("text").combine_chunks()
    scores = np.full(len(text), np.nan, dtype=np.float32)
    present = text.is_valid().to_numpy(zero_copy_only=False)
    scores[present] = score_texts(_classifier(model_path, positive_label), text.drop_null(), positive_label)
    target = Path(scores_dir) / f"part-{index:05d}.npy"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as out:
        np.save(out, scores)
    tmp.replace(target)
    return len(scores)


def global_cut(scores: list[np.ndarray], keep_fraction: float) -> tuple[float, list[int]]:
    """The score at the cut and, per part, how many documents scoring exactly that to keep, so
    that exactly round(keep_fraction * scored documents) are kept (documents without text never are)."""
    valid = np.concatenate([s[~np.isnan(s)] for s in scores]) if scores else np.zeros(0, np.float32)
    keep = round(keep_fraction * len(valid))
    if keep == 0:
        return float("inf"), [0] * len(scores)
    cut = np.partition(valid, len(valid) - keep)[len(valid) - keep]
    ties_wanted = keep - int((valid > cut).sum())
    quotas = []
    for part in scores:
        quotas.append(min(int((part == cut).sum()), ties_wanted))
        ties_wanted -= quotas[-1]
    return float(cut), quotas


def split_part(item: tuple[int, str, int | None], cut: float, scores_dir: str, stage_dir: str,
               caps: tuple[int | None, int | None]) -> dict:
    """Write one part's kept and removed documents with their scores; `None` quota keeps every tie."""
    index, path, tie_quota = item
    started = time.perf_counter()
    table = pq.read_table(path)
    scores = np.load(Path(scores_dir) / f"part-{index:05d}.npy")
    with np.errstate(invalid="ignore"):
        ties = scores == np.float32(cut)
        keep = scores > np.float32(cut)
    keep |= ties if tie_quota is None else ties & (np.cumsum(ties) <= tie_quota)
    missing = np.isnan(scores)
    table = table.append_column(SCORE_COLUMN, pa.array(scores, pa.float32(), mask=missing))
    reasons = np.where(missing[~keep], MISSING_TEXT, LOW_SCORE).tolist()
    io.write_parts(table.filter(pa.array(keep)), Path(stage_dir) / io.KEPT, index, *caps)
    removed = io.with_reason(table.filter(pa.array(~keep)), reasons)
    io.write_parts(removed, Path(stage_dir) / io.REMOVED, index, *caps)
    return {"kept": int(keep.sum()), "removed": int((~keep).sum()), "seconds": time.perf_counter() - started}


def score_histogram(values: np.ndarray) -> list[int]:
    bins = np.clip(np.searchsorted(HISTOGRAM_EDGES, values, side="right") - 1, 0, len(HISTOGRAM_EDGES) - 2)
    return np.bincount(bins, minlength=len(HISTOGRAM_EDGES) - 1).astype(int).tolist()


@custom_stage("classify", ClassifyConfig, produces_documents=True)
def run_classify(ctx: StageContext) -> StageResult:
    config: ClassifyConfig = ctx.config
    require_fasttext()
    if config.model is not None:
        files = ctx.reference(config.model).files
        model_path, model_stats = files[0], {"source": str(files[0])}
    else:
        trained = train_classifier(
            read_examples(ctx, config.positives, "positives"),
            read_examples(ctx, config.negatives, "negatives"),
            config.fasttext,
            ctx.stage_dir,
        )
        model_path, model_stats = trained.path, {"source": "trained", **trained.metrics}
    _classifier(str(model_path), config.positive_label)  # a bad file or label fails here, naming it
    parts = ctx.input_parts()
    scores_dir = ctx.stage_dir / SCORES_DIR
    score = functools.partial(score_part, model_path=str(model_path), positive_label=config.positive_label,
                              scores_dir=str(scores_dir))
    ctx.map(score, list(enumerate(map(str, parts))), f"{ctx.name}: score")
    scores = [np.load(scores_dir / f"part-{i:05d}.npy") for i in range(len(parts))]
    if config.keep_fraction is not None:
        cut, quotas = global_cut(scores, config.keep_fraction)
    else:
        cut, quotas = (config.threshold if config.threshold is not None else DEFAULT_THRESHOLD), [None] * len(parts)
    caps = (ctx.config.max_part_rows, ctx.config.max_part_bytes)
    split = functools.partial(split_part, cut=cut, scores_dir=str(scores_dir), stage_dir=str(ctx.stage_dir), caps=caps)
    ctx.map(split, [(i, str(p), q) for i, (p, q) in enumerate(zip(parts, quotas))], f"{ctx.name}: split")
    every = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    scored = every[~np.isnan(every)]
    stats = {
        "model": model_stats,
        "threshold": cut if np.isfinite(cut) else None,
        "keep_fraction": config.keep_fraction,
        "positive_label": config.positive_label,
        "scored": int(len(scored)),
        "mean_score": float(scored.mean()) if len(scored) else None,
        "histogram": {"edges": HISTOGRAM_EDGES, "counts": score_histogram(scored)},
    }
    return StageResult(counts={"in": int(len(every))}, stats=stats)
