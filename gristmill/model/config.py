"""Training settings: one validated model shared by the `train` workflow stage and `gristmill train`.

Model sizes, optimisation and run settings live side by side as flat keys so a workflow can set any
of them with `--set train.max_steps=500`. Vocabulary size and EOS id are not settings: they come
from the shards' `meta.json`. The defaults train a ~1M-parameter model for a few hundred steps on
two CPU cores in a couple of minutes (the quickstart); real runs raise the sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Which objectives train which architecture; the first is the default.
OBJECTIVES = {
    "decoder": ("causal", "prefix_lm"),
    "encoder": ("mlm",),
    "encoder_decoder": ("span_corruption", "prefix_lm"),
}
DEFAULT_OBJECTIVE = {architecture: objectives[0] for architecture, objectives in OBJECTIVES.items()}


class ParallelConfig(BaseModel):
    """How the processes started by torchrun split the work (see docs/parallelism.md). The product
    data x tensor x pipeline is the number of processes; `data` left out takes what remains."""

    model_config = ConfigDict(extra="forbid")

    data: int | None = Field(None, ge=1)  # model replicas, each reading its own slice of the batch
    shard: Literal["none", "optimizer", "full"] = "none"  # ZeRO-1 optimizer state, or FSDP2 everything
    tensor: int = Field(1, ge=1)  # processes splitting every matmul (DTensor, column/row-wise)
    pipeline: int = Field(1, ge=1)  # processes each holding a run of layers (torch.distributed.pipelining)
    schedule: Literal["gpipe", "1f1b"] = "1f1b"  # pipeline schedule
    microbatches: int = Field(2, ge=1)  # pipeline micro-batches per batch_size sequences


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # model
    architecture: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    n_layer: int = Field(4, ge=1)  # per stack: an encoder-decoder has n_layer encoder and n_layer decoder layers
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    seq_len: int = Field(128, ge=2)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_placement: Literal["pre", "post"] = "pre"  # post: BERT's original layout (exports to BERT)
    position: Literal["rope", "alibi", "learned", "relative"] = "rope"  # relative: T5's bucketed bias
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tie_weights: bool = True
    sliding_window: int | None = Field(None, ge=1)
    bias: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    objective: Literal["causal", "prefix_lm", "mlm", "span_corruption"] | None = None  # None: the architecture's own
    mask_fraction: float = Field(0.15, gt=0.0, lt=1.0)  # mlm: share of tokens selected (BERT)
    noise_density: float = Field(0.15, gt=0.0, lt=1.0)  # span_corruption: share of tokens dropped (T5)
    mean_span: float = Field(3.0, ge=1.0)  # span_corruption: mean length of a dropped span (T5)

    # optimisation
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per micro-batch per data-parallel replica
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimiser step
    learning_rate: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_steps: int = Field(30, ge=0)
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)  # WSD: share of steps spent decaying
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(1.0, gt=0)

    # run
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    compile: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    stop_at: int | None = Field(None, ge=1)  # end this run after this step; the schedule still spans max_steps
    peak_flops: float | None = Field(None, gt=0)  # per device, for MFU; known GPUs are detected
    sample_prompt: str = "The"
    sample_tokens: int = Field(48, ge=1)
    progress: bool = True
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _check_shapes(self) -> TrainConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("position=rope needs an even head size (n_embd / n_head)")
        if self.objective is None:
            self.objective = DEFAULT_OBJECTIVE[self.architecture]
        if self.objective not in OBJECTIVES[self.architecture]:
            raise ValueError(
                f"objective {self.objective!r} does not train architecture {self.architecture!r}; "
                f"use one of {OBJECTIVES[self.architecture]}"
            )
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    def transformer_config(self, vocab_size: int, decoder_start_id: int = 0):
        """The model's architecture for a vocabulary of `vocab_size` (torch is imported here, not
        at module import, so registering the stage stays cheap)."""
        from gristmill.model.model import ModelConfig

        return ModelConfig(
            vocab_size=vocab_size,
            architecture=self.architecture,
            seq_len=self.seq_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            norm=self.norm,
            norm_placement=self.norm_placement,
            position=self.position,
            mlp=self.mlp,
            tie_weights=self.tie_weights,
            sliding_window=self.sliding_window,
            bias=self.bias,
            dropout=self.dropout,
            decoder_start_id=decoder_start_id,
        )


def load_config(path: str | Path | None, overrides: dict[str, object] | None = None) -> TrainConfig:
    """Settings from a YAML file (or the defaults), then `overrides` on top; errors name the key."""
    values: dict[str, object] = {}
    if path is not None:
        path = Path(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of training settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        where = f"{path}" if path is not None else "training settings"
        raise ValueError(f"{where}: {error}") from None
