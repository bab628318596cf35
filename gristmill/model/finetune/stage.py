"""The `finetune` workflow stage: fine-tune the checkpoint of one upstream `train` (or `finetune`)
stage, or a `.pt` checkpoint named by path, on records from JSONL / Parquet files named by path, or from the kept parts of document
stages (for `classify`, e.g. `label_key: lang`).

    sft:
      type: finetune
      input: [train, ${GRISTMILL_DATA}/finetune/sft.jsonl]
      method: sft

It writes the loop's files (see `loop.py`) into its stage folder and resumes from its checkpoint
when the runner kept the folder (same config and input).
"""

from __future__ import annotations

from gristmill.model.finetune.config import FinetuneConfig
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage


class FinetuneStageConfig(StageConfig, FinetuneConfig):
    """`type: finetune`, `input: [<train or finetune stage>, data files or stages]`, and any
    fine-tuning setting (see `FinetuneConfig`)."""


@custom_stage("finetune", FinetuneStageConfig, produces_documents=False)
def finetune_stage(ctx: StageContext) -> StageResult:
    from gristmill.model.finetune.loop import finetune
    from gristmill.model.sample import CHECKPOINT_FILE  # torch loads only when a finetune stage runs

    models = [d for d in ctx.upstream_dirs() if (d / CHECKPOINT_FILE).is_file()]
    models += [p for p in ctx.input_files() if p.suffix == ".pt"]
    if len(models) != 1:
        raise ValueError(
            f"stage {ctx.name!r}: input must name exactly one model: a train or finetune stage (a folder with "
            f"{CHECKPOINT_FILE}) or a .pt checkpoint, got {ctx.config.input}"
        )
    data = [p for p in ctx.input_files() if p.suffix == ".jsonl"] + ctx.input_parts()
    if not data:
        raise ValueError(f"stage {ctx.name!r}: no .jsonl or .parquet records among its inputs {ctx.config.input}")
    settings = FinetuneConfig.model_validate(ctx.config.own_settings())
    resume = (ctx.stage_dir / CHECKPOINT_FILE).is_file()
    # a stage named by upstream `train`/`finetune` carries its checkpoint; any other upstream stage is data
    summary = finetune(settings, models[0], data, ctx.stage_dir, resume=resume)
    stats = {k: v for k, v in summary.items() if k not in ("steps", "checkpoint")}
    counts = {"steps": summary["steps"], "examples": summary["train_examples"], "removed": summary["removed"]}
    return StageResult(counts=counts, stats=stats)
