"""`gristmill train` and `gristmill sample`.

    gristmill train runs/quickstart/pack --out runs/my-model --max-steps 300
    gristmill train SHARDS --out DIR --config train.yaml --set position=alibi --resume
    torchrun --nproc_per_node 2 -m gristmill.model.train SHARDS --out DIR
    gristmill sample runs/my-model --prompt "The kernel" --temperature 0.8 --top-k 50
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
import yaml
from rich.console import Console

from gristmill.model.config import load_config


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs, values read as YAML scalars (`true`, `3`, `0.1`, `null`)."""
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def train_command(
    shards_dir: Path = typer.Argument(..., help="folder with meta.json and train_*.bin / val_*.bin shards"),
    out: Path = typer.Option(..., "--out", help="folder for checkpoint.pt, metrics.jsonl, samples.jsonl"),
    config: Path | None = typer.Option(None, "--config", help="YAML file of training settings"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="sequences per micro-batch per process"),
    grad_accum: int | None = typer.Option(None, "--grad-accum"),
    seq_len: int | None = typer.Option(None, "--seq-len"),
    n_layer: int | None = typer.Option(None, "--n-layer"),
    n_head: int | None = typer.Option(None, "--n-head"),
    n_embd: int | None = typer.Option(None, "--n-embd"),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "--lr"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1"),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help="torch.compile the model"),
    settings: list[str] = typer.Option([], "--set", help="any other setting, key=value (repeatable)"),
) -> None:
    """Train a GPT on packed token shards (DDP when started by torchrun)."""
    from gristmill.model.train import train  # torch loads only when a model command runs

    options = {
        "max_steps": max_steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "seq_len": seq_len,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "learning_rate": learning_rate,
        "device": device,
        "compile": compile,
    }
    overrides = {key: value for key, value in options.items() if value is not None} | parse_settings(settings)
    try:
        train_config = load_config(config, overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    summary = train(train_config, shards_dir, out, resume=resume)
    if int(os.environ.get("RANK", 0)) == 0:
        Console().print_json(json.dumps(summary))


def sample_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt, or the training folder holding it"),
    prompt: str = typer.Option("The", "--prompt"),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens"),
    temperature: float = typer.Option(0.8, "--temperature", help="0 is greedy"),
    top_k: int | None = typer.Option(50, "--top-k", help="0 turns it off"),
    top_p: float | None = typer.Option(0.95, "--top-p", help="1 turns it off"),
    num_samples: int = typer.Option(1, "--num-samples"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Print text continuing PROMPT, sampled from a trained checkpoint through its tokenizer."""
    import torch

    from gristmill.model.sample import load_model, sample_text

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, tokenizer, state = load_model(checkpoint, device)
    if tokenizer is None:
        raise typer.BadParameter(f"{checkpoint}: the checkpoint holds no tokenizer (its shards' meta.json named none)")
    for i in range(num_samples):
        text = sample_text(
            model,
            tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            top_p=top_p,
            eos_id=state.get("eos_id"),
            seed=seed + i,
        )
        typer.echo(text)
        if i + 1 < num_samples:
            typer.echo("---")
