"""`gristmill tokenizer train|eval|encode|compare`: the tokenizer workbench outside workflows.

Inputs are Parquet files (a `text` column; `id` and `lang` used when present), JSON-lines files
(`text` key) or plain text files (one document each), as paths, folders or globs.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from gristmill.tokenize import evaluate
from gristmill.tokenize.corpus import Sample, iter_documents, resolve_inputs
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import load_tokenizer, read_spec, save_tokenizer, train_tokenizer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate, compare tokenizers; encode to shards.")
console = Console(stderr=True)


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}")
    raise typer.Exit(2)


@app.command()
def train(
    inputs: list[str] = typer.Argument(..., help="Parquet / JSON-lines / text files, folders or globs"),
    out: Path = typer.Option(..., help="Folder to save the tokenizer in"),
    kind: str = typer.Option("bpe", help="bpe, wordpiece or unigram"),
    vocab_size: int = typer.Option(8000, help="Vocabulary size, special tokens included"),
    min_frequency: int | None = typer.Option(None, help="Minimum pair/word frequency (bpe, wordpiece)"),
    lowercase: bool = typer.Option(False, help="Lower-case the text first"),
    unicode_form: str | None = typer.Option(None, help="none, nfc, nfkc, nfd or nfkd (default per kind)"),
    pre_tokenizer: str = typer.Option("gpt2", help="gpt2 or llama3 (bpe only)"),
    holdout_fraction: float = typer.Option(0.05, help="Documents held out for `eval` (by id hash)"),
    seed: int = typer.Option(0, help="Seed of the held-out split"),
    max_bytes: int | None = typer.Option(None, help="Train on at most this many UTF-8 bytes"),
    max_docs: int | None = typer.Option(None, help="Train on at most this many documents"),
) -> None:
    """Train one tokenizer and save it as a folder `AutoTokenizer.from_pretrained` loads."""
    try:
        spec = TokenizerSpec(name=out.name, kind=kind, vocab_size=vocab_size, min_frequency=min_frequency,
                             lowercase=lowercase, unicode_form=unicode_form, pre_tokenizer=pre_tokenizer)
        sample = Sample("train", holdout_fraction, seed, max_bytes, max_docs)
        trained = train_tokenizer(spec, resolve_inputs(inputs), sample, show_progress=True)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    save_tokenizer(trained, out)
    console.print(
        f"trained {kind} ({trained.tokenizer.get_vocab_size()} tokens) on {trained.train_docs:,} documents, "
        f"{trained.train_bytes:,} bytes in {trained.train_seconds:.1f}s -> {out}"
    )


def _report(tokenizers: list[Path], inputs: list[str], holdout_fraction: float, seed: int, max_docs: int) -> dict:
    side = "split" if holdout_fraction > 0 else "train"
    tables = list(iter_documents(resolve_inputs(inputs), Sample(side, holdout_fraction, seed, max_docs=max_docs)))
    texts = [x for t in tables for x in t["text"].to_pylist()]
    langs = [x for t in tables for x in t["lang"].to_pylist()]
    report: dict = {"holdout": {"fraction": holdout_fraction, "seed": seed, "docs": len(texts)}, "tokenizers": {}}
    for path in tokenizers:
        folder = path if path.is_dir() else path.parent
        spec = read_spec(folder) if (folder / "spec.json").exists() else {}
        promised = TokenizerSpec(**{k: v for k, v in spec.items() if k in TokenizerSpec.model_fields}).round_trip_promised \
            if spec else False
        name = spec.get("name", folder.name)
        report["tokenizers"][name] = {
            "kind": spec.get("kind", "?"),
            "path": str(path),
            "metrics": evaluate.evaluate(load_tokenizer(path), texts, langs, promised),
        }
    return report


EVAL_HELP = "Held-out fraction to evaluate on (the split `train` left out with the same seed); 0 = all"


@app.command("eval")
def eval_(
    tokenizer: Path = typer.Argument(..., help="Tokenizer folder or tokenizer.json"),
    inputs: list[str] = typer.Argument(..., help="Documents to evaluate on"),
    holdout_fraction: float = typer.Option(0.05, help=EVAL_HELP),
    seed: int = typer.Option(0),
    max_docs: int = typer.Option(2000, help="Evaluate on at most this many documents"),
    out: Path | None = typer.Option(None, help="Write report.json and report.md here"),
) -> None:
    """Every metric of one tokenizer on held-out documents, as JSON on stdout."""
    try:
        report = _report([tokenizer], inputs, holdout_fraction, seed, max_docs)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    if out is not None:
        evaluate.write_report(report, out)
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False))


@app.command()
def compare(
    tokenizers: list[Path] = typer.Argument(..., help="Two or more tokenizer folders or tokenizer.json files"),
    inputs: list[str] = typer.Option(..., "--input", "-i", help="Documents to compare on (repeatable)"),
    holdout_fraction: float = typer.Option(0.05, help=EVAL_HELP),
    seed: int = typer.Option(0),
    max_docs: int = typer.Option(2000, help="Compare on at most this many documents"),
    out: Path | None = typer.Option(None, help="Write report.json and report.md here"),
) -> None:
    """Tokenizers side by side on the same held-out documents, as a Markdown table on stdout."""
    try:
        report = _report(tokenizers, inputs, holdout_fraction, seed, max_docs)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    if out is not None:
        evaluate.write_report(report, out)
    typer.echo(evaluate.markdown_table(report))


@app.command()
def encode(
    tokenizer: Path = typer.Argument(..., help="Tokenizer folder or tokenizer.json"),
    inputs: list[str] = typer.Argument(None, help="Documents to pack into shards (omit with --text)"),
    out: Path | None = typer.Option(None, help="Folder for the shards and meta.json"),
    text: str | None = typer.Option(None, help="Print the ids and tokens of this text instead"),
    val_fraction: float = typer.Option(0.0, help="Documents (by id hash) for val_*.bin shards"),
    seed: int = typer.Option(0),
    shard_tokens: int = typer.Option(100_000_000, help="Tokens per shard"),
    engine: str = typer.Option("auto", help="auto, tiktoken or tokenizers"),
    eos_token: str | None = typer.Option(None, help="EOS token (default: the tokenizer's)"),
) -> None:
    """Encode documents into token shards + meta.json (as the pack stage does), or show one text."""
    try:
        if text is not None:
            encoding = load_tokenizer(tokenizer).encode(text, add_special_tokens=False)
            typer.echo(json.dumps({"ids": encoding.ids, "tokens": encoding.tokens}, ensure_ascii=False))
            return
        if not inputs or out is None:
            raise ValueError("give INPUTS and --out to pack shards, or --text to encode one text")
        meta = pack(resolve_inputs(inputs), out, tokenizer, serial_map, engine=engine, val_fraction=val_fraction,
                    seed=seed, shard_tokens=shard_tokens, eos_token=eos_token)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    console.print(
        f"{sum(meta['tokens'].values()):,} tokens of {sum(meta['documents'].values()):,} documents in "
        f"{len(meta['shards'])} shard(s), engine {meta['engine']}, {meta['tokens_per_s']:,.0f} tokens/s -> {out}"
    )
