"""`gristmill train` and the torchrun entry point: settings from the command line into the loop.

    gristmill train runs/quickstart/pack --out runs/my-model --max-steps 300
    gristmill train SHARDS --out DIR --config train.yaml --set position=alibi --resume
    torchrun --nproc_per_node 2 -m gristmill.model.train SHARDS --out DIR [options]

The loop itself is `loop.py`; this module only parses options, so `gristmill --help` starts without
loading torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from rich.console import Console

from gristmill.model.config import load_config


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs, values read as YAML scalars (`true`, `3`, `0.1`, `null`); a dotted key
    (`parallel.tensor=2`) sets one field of a nested setting."""
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        *parents, name = key.strip().split(".")
        target = settings
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise typer.BadParameter(f"--set {pair!r}: {parent!r} is not a mapping")
        target[name] = yaml.safe_load(value)
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
    """Train a GPT on packed token shards (split by the `parallel` settings when started by torchrun)."""
    from gristmill.model.loop import NonFiniteLoss, train  # torch loads only when training starts

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
    report_run(lambda: train(train_config, shards_dir, out, resume=resume), (NonFiniteLoss,))


def report_run(run: Callable[[], dict], handled: tuple[type[Exception], ...]) -> None:
    """Run a training loop; an expected failure is printed as plain text (it may hold brackets) with
    exit code 1, and rank 0 prints the summary as JSON."""
    try:
        summary = run()
    except handled as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    if int(os.environ.get("RANK", 0)) == 0:
        Console().print_json(json.dumps(summary))


if __name__ == "__main__":
    typer.run(train_command)
