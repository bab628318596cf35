"""`gristmill sample`, `gristmill fill-mask` and `gristmill export` (`gristmill train` is in train.py,
beside the loop it starts).

    gristmill sample runs/my-model --prompt "The kernel" --temperature 0.8 --top-k 50
    gristmill fill-mask runs/my-bert "The <mask> is loaded at boot" --top-k 5
    gristmill export runs/quickstart/train --format hf exported/
"""

from __future__ import annotations

from pathlib import Path

import typer


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


def fill_mask_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt of an encoder, or the training folder holding it"),
    text: str = typer.Argument(..., help="text holding one or more mask tokens ([MASK] or <mask>)"),
    top_k: int = typer.Option(5, "--top-k", min=1),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Print the top-k tokens (with probabilities) an encoder predicts for each mask token in TEXT."""
    import torch

    from gristmill.model.sample import fill_mask, load_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, tokenizer, _ = load_model(checkpoint, device)
    if tokenizer is None:
        raise typer.BadParameter(f"{checkpoint}: the checkpoint holds no tokenizer (its shards' meta.json named none)")
    try:
        _, choices = fill_mask(model, tokenizer, text, top_k)
    except ValueError as error:
        raise typer.BadParameter(f"{checkpoint}: {error}") from None
    for number, options in enumerate(choices):
        typer.echo(f"mask {number}: " + "  ".join(f"{token!r} {p:.3f}" for token, p in options))


def export_command(
    train_dir: Path = typer.Argument(..., help="checkpoint.pt, or the training folder holding it (RUN/train)"),
    out: Path = typer.Argument(..., help="folder to write"),
    export_format: str = typer.Option("hf", "--format", help="hf: a transformers folder (config.json, safetensors, tokenizer)"),
) -> None:
    """Export a trained model for another ecosystem (today: Hugging Face transformers)."""
    from gristmill.model.export import NotExportable, export_hf

    if export_format != "hf":
        raise typer.BadParameter(f"--format {export_format!r}: only 'hf' is supported")
    try:
        folder = export_hf(train_dir, out)
    except NotExportable as error:
        raise typer.BadParameter(f"{train_dir}: {error}") from None
    typer.echo(f"wrote {folder}")
