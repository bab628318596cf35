"""The `train` workflow stage: train a Transformer on the shards of one upstream `pack` stage (or of a
folder named by path that holds `meta.json` and `train_*.bin` / `val_*.bin`).

It writes `checkpoint.pt`, `metrics.jsonl` and `samples.jsonl` into its stage folder (see
`loop.py`) and resumes from the checkpoint when the runner kept the folder (same config and input).
"""

from __future__ import annotations

from pydantic import Field

from gristmill.model.config import TrainConfig
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage
from gristmill.tokenize.shards import META_FILE


class TrainStageConfig(StageConfig, TrainConfig):
    """`type: train`, `input: <pack stage>`, and any training setting (see `TrainConfig`);
    `nproc_per_node` above 1 starts that many processes with torchrun (see `parallel`)."""

    nproc_per_node: int = Field(1, ge=1)


@custom_stage("train", TrainStageConfig, produces_documents=False)
def train_stage(ctx: StageContext) -> StageResult:
    from gristmill.model.loop import train
    from gristmill.model.sample import CHECKPOINT_FILE  # torch loads only when a train stage runs

    shard_dirs = ctx.upstream_dirs() + [p.parent for p in ctx.input_files() if p.name == META_FILE]
    if len(shard_dirs) != 1:
        raise ValueError(
            f"stage {ctx.name!r}: input must be exactly one pack stage or one folder holding {META_FILE} "
            f"and token shards, got {ctx.config.input}"
        )
    own = ctx.config.own_settings()
    own.pop("nproc_per_node")  # how many processes, not how to train
    settings = TrainConfig.model_validate(own)
    resume = (ctx.stage_dir / CHECKPOINT_FILE).is_file()
    if ctx.config.nproc_per_node > 1:
        from gristmill.model.parallel.launch import torchrun_train

        summary = torchrun_train(settings, shard_dirs[0], ctx.stage_dir, resume, ctx.config.nproc_per_node)
    else:
        summary = train(settings, shard_dirs[0], ctx.stage_dir, resume=resume)
    stats = {
        key: summary.get(key)
        for key in ("final_loss", "val_loss", "val_accuracy", "tokens_per_sec", "mfu", "params", "flops_per_token", "layout")
    }
    return StageResult(counts={"steps": summary["steps"], "tokens": summary["tokens"]}, stats=stats)
