"""Fine-tuning settings: one validated model for the `finetune` stage and `gristmill finetune`.

The architecture is not a setting: it comes from the input checkpoint. The optimisation keys have
the pre-training names (and `learning_rate_at` reads them), with fine-tuning defaults: a learning
rate ten times below the quickstart's pre-training peak and a short warmup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METHODS = ("sft", "dpo", "classify")


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["sft", "dpo", "classify"]

    # data
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # records held out (by a hash of the record) for eval
    pack: bool = True  # sft: several examples per sequence, attention kept inside each example
    beta: float = Field(0.1, gt=0.0)  # dpo: strength of the pull towards the reference (DPO paper's beta)
    label_key: str = "label"  # classify: the record field (or Parquet column) holding the label
    # classify: what the head sees; the mean over the text's tokens, since a small decoder's last
    # token alone carries little of the text after a short pre-training ("last" is the GPT-1 way)
    pooling: Literal["mean", "last"] = "mean"

    # optimisation (same names and meaning as pre-training)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences (sft), pairs (dpo) or texts (classify) per micro-batch
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = Field(5, ge=0)
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0)

    # run
    seed: int = 1337
    device: str = "auto"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    stop_at: int | None = Field(None, ge=1)  # end this run after this step; the schedule still spans max_steps
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


def load_finetune_config(path: str | Path | None, overrides: dict[str, object] | None = None) -> FinetuneConfig:
    """Settings from a YAML file (or the defaults), then `overrides` on top; errors name the key."""
    values: dict[str, object] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of fine-tuning settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    try:
        return FinetuneConfig.model_validate(values)
    except ValidationError as error:
        raise ValueError(f"{path or 'fine-tuning settings'}: {error}") from None
