"""The `tokenizers` and `pack` stages of a workflow.

`tokenizers` trains every tokenizer listed in its config on the upstream kept documents (minus a
held-out split), saves each as `<stage>/<name>/` and compares them on the held-out documents
(`report.json`, `report.md`). `pack` encodes the kept documents with one of them into token shards.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from gristmill.pipeline import io
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage
from gristmill.tokenize import evaluate
from gristmill.tokenize.corpus import Sample, iter_documents
from gristmill.tokenize.pack import UNIT_DOCS, pack
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import (
    SPEC_FILE,
    TOKENIZER_FILE,
    TrainedTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

# A trained vocabulary under this share of the asked size gets a warning in stats.json and on the
# dashboard: the corpus ran out of merges (vocab_size 100000 on a tiny corpus gives a few hundred).
VOCAB_SHORTFALL_WARNING = 0.5


def vocab_shortfall(name: str, asked: int, trained: int) -> str | None:
    """A warning when a tokenizer ended far below its asked vocabulary size, else None."""
    if trained >= VOCAB_SHORTFALL_WARNING * asked:
        return None
    return (f"tokenizer {name!r}: vocab_size {asked} was asked, the training text gave only {trained} tokens "
            f"({trained / asked:.1%}); train on more text or ask for a smaller vocabulary")


class TokenizersConfig(StageConfig):
    """Tokenizers to train and how much text to train and evaluate them on."""

    tokenizers: list[TokenizerSpec] = Field(min_length=1)
    holdout_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    seed: int = 0
    max_train_bytes: int | None = Field(default=200_000_000, ge=1)
    max_train_docs: int | None = Field(default=None, ge=1)
    eval_max_docs: int = Field(default=2000, ge=1)
    show_progress: bool = True

    @field_validator("tokenizers")
    @classmethod
    def _unique_names(cls, specs: list[TokenizerSpec]) -> list[TokenizerSpec]:
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tokenizer names must be unique; repeated: {duplicates}")
        return specs


def _already_trained(folder: Path, spec: TokenizerSpec) -> TrainedTokenizer | None:
    """A tokenizer saved by an interrupted attempt with the same spec (resume), else None."""
    saved = io.read_json(folder / SPEC_FILE)
    if saved is None or not (folder / TOKENIZER_FILE).exists():
        return None
    if {k: saved.get(k) for k in spec.model_dump()} != spec.model_dump():
        return None
    return TrainedTokenizer(spec, load_tokenizer(folder), saved["train_docs"], saved["train_bytes"],
                            saved["train_seconds"])


@custom_stage("tokenizers", TokenizersConfig, produces_documents=False)
def run_tokenizers(ctx: StageContext) -> StageResult:
    config: TokenizersConfig = ctx.config
    parts = ctx.input_parts()
    if not parts:
        raise ValueError(f"stage {ctx.name!r}: no input documents (no kept Parquet parts upstream)")
    train_sample = Sample("train", config.holdout_fraction, config.seed, config.max_train_bytes, config.max_train_docs)
    holdout_sample = Sample("split", config.holdout_fraction, config.seed, max_docs=config.eval_max_docs)
    heldout = [t for t in iter_documents(parts, holdout_sample)]
    texts = [x for t in heldout for x in t["text"].to_pylist()]
    langs = [x for t in heldout for x in t["lang"].to_pylist()]

    report: dict = {
        "holdout": {
            "fraction": config.holdout_fraction,
            "seed": config.seed,
            "docs": len(texts),
            "chars": sum(len(t) for t in texts),
            "langs": {lang: langs.count(lang) for lang in sorted({x for x in langs if x})},
        },
        "tokenizers": {},
        "warnings": [],
    }
    for spec in config.tokenizers:
        folder = ctx.stage_dir / spec.name
        trained = _already_trained(folder, spec)
        if trained is None:
            # The trainer's own bars only make sense on a terminal; in logs they print blank lines.
            trained = train_tokenizer(spec, parts, train_sample, config.show_progress and sys.stderr.isatty())
            save_tokenizer(trained, folder)
        trained_size = trained.tokenizer.get_vocab_size(with_added_tokens=True)
        warning = vocab_shortfall(spec.name, spec.vocab_size, trained_size)
        if warning is not None:
            report["warnings"].append(warning)
            print(f"warning: {warning}", file=sys.stderr)
        report["tokenizers"][spec.name] = {
            "kind": spec.kind,
            "vocab_size_asked": spec.vocab_size,
            "path": str(folder),
            "train_docs": trained.train_docs,
            "train_bytes": trained.train_bytes,
            "train_seconds": round(trained.train_seconds, 3),
            "metrics": evaluate.evaluate(trained.tokenizer, texts, langs, spec.round_trip_promised),
        }
    evaluate.write_report(report, ctx.stage_dir)
    first = next(iter(report["tokenizers"].values()))
    counts = {"tokenizers": len(config.tokenizers), "train_docs": first["train_docs"], "holdout_docs": len(texts)}
    return StageResult(counts=counts, stats={**report, "table": evaluate.comparison_rows(report)})


class PackConfig(StageConfig):
    """`input: [<documents stage>, <tokenizers stage>]`; `tokenizer` names one trained there, or is a
    path to a tokenizer folder / tokenizer.json."""

    tokenizer: str
    val_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    seed: int = 0
    shard_tokens: int = Field(default=100_000_000, ge=1)
    engine: Literal["auto", "tiktoken", "tokenizers"] = "auto"
    verify_docs: int = Field(default=64, ge=1)
    eos_token: str | None = None
    # Parallelism comes from the Dask workers (one encode task per unit on each); tiktoken threads
    # inside a task would only oversubscribe their cores.
    threads: int = Field(default=1, ge=1)
    unit_docs: int = Field(default=UNIT_DOCS, ge=1)


def resolve_tokenizer(ctx: StageContext, name: str) -> Path:
    """The tokenizer folder called `name` in an upstream tokenizers stage, else `name` as a path."""
    trained = []
    for stage_dir in ctx.upstream_dirs("tokenizers"):
        candidate = stage_dir / name
        if (candidate / TOKENIZER_FILE).exists():
            return candidate
        trained += [p.name for p in stage_dir.iterdir() if (p / TOKENIZER_FILE).exists()]
    path = Path(name).expanduser()
    path = path if path.is_absolute() else ctx.workflow_dir / path
    if path.exists():
        return path
    raise ValueError(
        f"stage {ctx.name!r}, key 'tokenizer': {name!r} is neither a tokenizer of an upstream tokenizers "
        f"stage (trained: {sorted(trained)}) nor an existing path"
    )


@custom_stage("pack", PackConfig, produces_documents=False)
def run_pack(ctx: StageContext) -> StageResult:
    config: PackConfig = ctx.config
    meta = pack(
        ctx.input_parts(),
        ctx.stage_dir,
        resolve_tokenizer(ctx, config.tokenizer),
        ctx.map,
        engine=config.engine,
        val_fraction=config.val_fraction,
        seed=config.seed,
        shard_tokens=config.shard_tokens,
        verify_docs=config.verify_docs,
        eos_token=config.eos_token,
        threads=config.threads,
        unit_docs=config.unit_docs,
    )
    counts = {
        "documents": sum(meta["documents"].values()),
        "train_tokens": meta["tokens"]["train"],
        "val_tokens": meta["tokens"]["val"],
        "shards": len(meta["shards"]),
    }
    return StageResult(counts=counts, stats={k: v for k, v in meta.items() if k != "shards"} | {
        "shard_files": [s["file"] for s in meta["shards"]]})
