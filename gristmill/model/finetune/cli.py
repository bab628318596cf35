"""`gristmill finetune`: settings from the command line into the fine-tuning loop.

    gristmill finetune runs/quickstart/train gristmill/data/finetune/sft.jsonl --method sft --out runs/sft
    gristmill finetune runs/sft DATA.jsonl --method dpo --out runs/dpo --set beta=0.2 --resume
    torchrun --nproc_per_node 2 -m gristmill.model.finetune.cli CHECKPOINT DATA --method sft --out DIR
"""

from __future__ import annotations

from pathlib import Path

import typer

from gristmill.model.finetune.config import load_finetune_config
from gristmill.model.train import parse_settings, report_run


def finetune_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt, or the train / finetune folder holding it"),
    data: list[Path] = typer.Argument(..., help="JSONL or Parquet files of records"),
    method: str = typer.Option(..., "--method", help="sft, dpo or classify"),
    out: Path = typer.Option(..., "--out", help="folder for checkpoint.pt, metrics.jsonl, removed.json"),
    config: Path | None = typer.Option(None, "--config", help="YAML file of fine-tuning settings"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
    max_steps: int | None = typer.Option(None, "--max-steps"),
    settings: list[str] = typer.Option([], "--set", help="any other setting, key=value (repeatable)"),
) -> None:
    """Instruction-tune (sft), preference-align (dpo) or train a classifier (classify) from a checkpoint."""
    from gristmill.model.finetune.loop import finetune
    from gristmill.model.loop import NonFiniteLoss

    for path in data:
        if not path.is_file():
            raise typer.BadParameter(f"{path}: no such data file")
    overrides = {"method": method} | ({"max_steps": max_steps} if max_steps else {}) | parse_settings(settings)
    try:
        finetune_config = load_finetune_config(config, overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    report_run(lambda: finetune(finetune_config, checkpoint, data, out, resume=resume),
               (NonFiniteLoss, ValueError, FileNotFoundError))


if __name__ == "__main__":
    typer.run(finetune_command)
