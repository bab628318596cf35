"""The `evaluate` stage: trained models compared on the same held-out text, in bits per byte.

`input` names the models: `train` stages of this run, or checkpoints of other runs (a
`checkpoint.pt` file or the training folder holding one). `heldout` names the held-out sets:
stages (their kept documents) or files read as the `read` stage reads them (JSONL, Parquet, text).

For each model and set, every document is encoded with the model's own tokenizer and scored
token by token, context restarting at each document (an EOS token before its first token, as in
training) and at every `seq_len` tokens. Loss is nats per token, perplexity exp(loss), and bits
per byte = total nats / ln 2 / total UTF-8 bytes of the documents: the one of the three that does
not depend on the tokenizer, so models with different vocabularies compare on it. Causal models
only (an MLM's accuracy is not measured here).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from gristmill.pipeline import io
from gristmill.pipeline.read import ReadConfig, file_format, file_spans, read_files
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage


class EvaluateConfig(StageConfig):
    """`input`: train stages or checkpoints; `heldout`: one or more stages or files of documents."""

    heldout: list[str] = Field(min_length=1)
    max_docs: int | None = Field(1000, ge=1)  # per held-out set, the first ones in part order
    batch_size: int = Field(16, ge=1)  # windows per forward pass
    device: str = "auto"  # auto: cuda when available, else cpu

    def references(self) -> list[str]:
        return [*self.input, *self.heldout]


def heldout_texts(ctx: StageContext, entry: str, max_docs: int | None) -> list[str]:
    """The texts of one held-out set, at most `max_docs` of them."""
    source = ctx.reference(entry)
    if source.is_stage:
        import pyarrow.parquet as pq

        texts = [t for p in io.kept_parts(source.stage_dir) for t in pq.read_table(p, columns=["text"])["text"].to_pylist()]
    else:
        config = ReadConfig(type="read")
        spans = [span for p in source.files
                 for span in file_spans(p, p.name, file_format(p, config.format), config.split_bytes)]
        table = read_files(spans, config).kept
        texts = table.column("text").to_pylist()
    texts = [t for t in texts if t][:max_docs]
    if not texts:
        raise ValueError(f"stage {ctx.name!r}, key 'heldout': {entry!r} holds no documents with text")
    return texts


def model_checkpoints(ctx: StageContext) -> dict[str, Path]:
    """Each `input` entry's checkpoint file, by entry name."""
    from gristmill.model.sample import CHECKPOINT_FILE

    checkpoints = {}
    for entry in ctx.inputs:
        if entry.is_stage:
            path = entry.stage_dir / CHECKPOINT_FILE
        else:
            found = [p for p in entry.files if p.suffix == ".pt"]
            if len(found) != 1:
                raise ValueError(f"stage {ctx.name!r}, key 'input': {entry.name!r} should name one checkpoint "
                                 f"(a .pt file or a training folder), found {len(found)}")
            path = found[0]
        if not path.is_file():
            raise ValueError(f"stage {ctx.name!r}, key 'input': {entry.name!r} has no {CHECKPOINT_FILE}")
        checkpoints[entry.name] = path
    return checkpoints


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Chunks of at most seq_len + 1 tokens overlapping by one: every token after the first is
    predicted exactly once, from the context of its own chunk."""
    return [ids[start : start + seq_len + 1] for start in range(0, max(len(ids) - 1, 0), seq_len)]


def score_texts(model, tokenizer, eos_id: int | None, texts: list[str], batch_size: int) -> dict:
    """Summed negative log-likelihood (nats), tokens predicted and bytes of `texts` under `model`."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    seq_len = model.config.seq_len
    chunks = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        chunks += windows(([eos_id] if eos_id is not None else []) + ids, seq_len)
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            width = max(len(c) for c in batch) - 1
            x = torch.zeros((len(batch), width), dtype=torch.long)
            y = torch.full((len(batch), width), -1, dtype=torch.long)
            for row, chunk in enumerate(batch):
                x[row, : len(chunk) - 1] = torch.tensor(chunk[:-1])
                y[row, : len(chunk) - 1] = torch.tensor(chunk[1:])
            x, y = x.to(device), y.to(device)
            logits, _ = model(x, y)
            nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                                    reduction="sum").item()
            tokens += int((y >= 0).sum())
    return {"nats": nats, "tokens": tokens, "bytes": sum(len(t.encode("utf-8")) for t in texts)}


def summary(scored: dict, docs: int) -> dict:
    """Bits per byte, loss (nats per token) and perplexity from summed counts."""
    loss = scored["nats"] / scored["tokens"] if scored["tokens"] else float("nan")
    return {
        "bits_per_byte": scored["nats"] / math.log(2) / scored["bytes"] if scored["bytes"] else float("nan"),
        "loss": loss,
        "perplexity": math.exp(loss) if scored["tokens"] else float("nan"),
        "tokens": scored["tokens"],
        "bytes": scored["bytes"],
        "docs": docs,
    }


@custom_stage("evaluate", EvaluateConfig, produces_documents=False)
def run_evaluate(ctx: StageContext) -> StageResult:
    import torch

    from gristmill.model.sample import load_model  # torch loads only when an evaluate stage runs

    config: EvaluateConfig = ctx.config
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    sets = {entry: heldout_texts(ctx, entry, config.max_docs) for entry in config.heldout}
    table = []
    for name, path in model_checkpoints(ctx).items():
        model, tokenizer, checkpoint = load_model(path, device)
        if tokenizer is None:
            raise ValueError(f"stage {ctx.name!r}: model {name!r} ({path}) carries no tokenizer to encode text with")
        if model.config.architecture != "decoder":
            raise ValueError(f"stage {ctx.name!r}: model {name!r} ({path}) is an {model.config.architecture}; bits per "
                             f"byte of a text are defined here for decoders (causal language models) only")
        for heldout, texts in sets.items():
            scored = score_texts(model, tokenizer, checkpoint.get("eos_id"), texts, config.batch_size)
            table.append({"model": name, "heldout": heldout, "checkpoint": str(path),
                          "step": checkpoint.get("step"), **summary(scored, len(texts))})
    counts = {"models": len(table) // max(len(sets), 1), "heldout_sets": len(sets),
              "tokens": sum(r["tokens"] for r in table)}
    return StageResult(counts=counts, stats={"table": table, "device": device})
