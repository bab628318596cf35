"""Stage types used only by the runner tests (registered through a workflow's `imports:`)."""

from __future__ import annotations

import time

from gristmill.pipeline import io
from gristmill.pipeline.stage import (
    PartitionOutput,
    StageConfig,
    StageContext,
    StageResult,
    custom_stage,
    document_stage,
)


class SlowCopyConfig(StageConfig):
    seconds_per_part: float = 0.0
    drop_shorter_than: int = 0


@document_stage("slow_copy", SlowCopyConfig)
def slow_copy(table, config: SlowCopyConfig) -> PartitionOutput:
    """Keep documents of at least `drop_shorter_than` characters, taking its time per part."""
    time.sleep(config.seconds_per_part)
    lengths = [len(t) for t in table.column("text").to_pylist()]
    keep = [n >= config.drop_shorter_than for n in lengths]
    kept = table.filter(keep)
    removed = io.with_reason(table.filter([not k for k in keep]), "slow_copy:too_short")
    return PartitionOutput(kept, removed, {"characters": sum(lengths), "parts_seen": 1})


class LeakyConfig(StageConfig):
    pass


@document_stage("leaky", LeakyConfig)
def leaky(table, config: LeakyConfig) -> PartitionOutput:
    """Loses the last document of every part: the runner must notice."""
    return PartitionOutput(table.slice(0, max(table.num_rows - 1, 0)), io.with_reason(table.slice(0, 0), "x"))


@custom_stage("leaky_global", LeakyConfig, produces_documents=True)
def leaky_global(ctx: StageContext) -> StageResult:
    """Claims to keep everything but writes only the first input part."""
    import pyarrow.parquet as pq

    parts = ctx.input_parts()
    table = pq.read_table(parts[0])
    io.write_parquet_atomic(table, ctx.stage_dir / io.KEPT / io.part_name(0))
    io.write_parquet_atomic(io.with_reason(table.slice(0, 0), "x"), ctx.stage_dir / io.REMOVED / io.part_name(0))
    total = io.count_rows(parts)
    return StageResult(counts={"in": total, "kept": total, "removed": 0})
