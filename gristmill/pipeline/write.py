"""The `write` stage: export the kept documents of upstream stages as JSONL or Parquet.

One output file per input part, written atomically, so an export can be resumed and read in
parallel by other tools. By default the files go to `<stage>/export/`; `path:` sends them elsewhere.
The strings a pii stage replaced are nulled in the export unless `pii_originals: true`.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from gristmill.pipeline import io
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage


class WriteConfig(StageConfig):
    format: Literal["jsonl", "parquet"] = "jsonl"
    path: str | None = None  # a folder; default: the stage's own `export/` folder
    columns: list[str] | None = None  # default: every column
    gzip: bool = False  # JSONL only: write `.jsonl.gz`
    # Export the strings the pii stage replaced (`pii_spans[].original`). Off: exports hold only
    # scrubbed text and span positions. On: whoever reads the export sees the raw personal data.
    pii_originals: bool = False


def export_part(item: tuple[int, str], config: WriteConfig, out_dir: str) -> dict:
    """Write one input part to `out_dir`; returns the file written and its row count."""
    index, in_path = item
    table = pq.read_table(in_path, columns=config.columns)
    if not config.pii_originals:
        table = io.without_pii_originals(table)
    stem = io.part_name(index).removesuffix(".parquet")
    if config.format == "parquet":
        target = Path(out_dir) / f"{stem}.parquet"
        io.write_parquet_atomic(table, target)
    else:
        suffix = ".jsonl.gz" if config.gzip else ".jsonl"
        target = Path(out_dir) / f"{stem}{suffix}"
        lines = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in table.to_pylist())
        data = lines.encode()
        io.write_bytes_atomic(gzip.compress(data, mtime=0) if config.gzip else data, target)
    return {"file": str(target), "rows": table.num_rows}


@custom_stage("write", WriteConfig)
def write_documents(ctx: StageContext) -> StageResult:
    config: WriteConfig = ctx.config
    out_dir = Path(config.path) if config.path else ctx.stage_dir / "export"
    if not out_dir.is_absolute() and config.path:
        out_dir = ctx.workflow_dir / out_dir
    parts = ctx.input_parts()
    task = functools.partial(export_part, config=config, out_dir=str(out_dir))
    written = ctx.map(task, list(enumerate(str(p) for p in parts)), ctx.name)
    return StageResult(
        counts={"documents": sum(w["rows"] for w in written), "files": len(written)},
        stats={"format": config.format, "output_dir": str(out_dir), "files": [w["file"] for w in written]},
    )
