"""Is a finished stage's output still what it wrote? Cheap checks of its Parquet parts.

When a part is written, its size and a hash of its Parquet footer are recorded (in the part state
and in `_DONE.json`). The footer holds the row count, the row-group layout and column statistics,
so a truncated, rewritten or replaced part changes the size or the footer hash. Checking costs one
`stat` and one small read at the end of each file, never a scan of the data; `run` and `status`
check before trusting a stage, and name each file that no longer matches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gristmill.pipeline import io, storage

_TAIL = 8  # a Parquet file ends with the 4-byte footer length and the magic `PAR1`


def footer_hash(path: str | os.PathLike) -> str:
    """sha256 (16 hex digits) of the Parquet footer with its trailer; of the whole file when it is
    too short or damaged to have one, so the hash of a broken file never matches a good one."""
    with storage.location(path).open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        length = 0
        if size >= _TAIL:
            f.seek(size - _TAIL)
            trailer = f.read(_TAIL)
            if trailer[4:] == b"PAR1":
                length = int.from_bytes(trailer[:4], "little")
        start = size - length - _TAIL if 0 < length <= size - _TAIL else 0
        f.seek(start)
        return hashlib.sha256(f.read()).hexdigest()[:16]


def part_record(path: str | os.PathLike) -> dict:
    """What to remember of a part just written: its size in bytes and footer hash."""
    return {"bytes": storage.location(path).stat().st_size, "footer": footer_hash(path)}


def output_records(stage_dir: Path) -> dict[str, dict]:
    """Records of every kept/ and removed/ part of a stage, keyed by path relative to the stage."""
    parts = io.kept_parts(stage_dir) + io.removed_parts(stage_dir)
    return {p.relative_to(stage_dir).as_posix(): part_record(p) for p in parts}


def part_problem(path: Path, record: dict) -> str | None:
    """Why the part at `path` is no longer the one recorded, or None when it still matches."""
    if not storage.is_published(path):
        return f"{path}: missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path}: {size:,} bytes on disk, {record['bytes']:,} when written ({_rows_note(path)})"
    if footer_hash(path) != record["footer"]:
        return f"{path}: Parquet footer changed since it was written ({_rows_note(path)})"
    return None


def _rows_note(path: Path) -> str:
    try:
        return f"{storage.parquet_file(path).metadata.num_rows:,} rows now"
    except Exception as error:  # whatever pyarrow says of a broken file is the message
        return f"not readable Parquet: {type(error).__name__}: {error}"


def output_problems(stage_dir: Path, done: dict) -> list[str]:
    """Every way a done stage's parts differ from its `_DONE.json`: changed, missing or extra
    parts. An empty list means its output can be trusted (or it records no parts)."""
    recorded = done.get("parts")
    if recorded is None:
        return []
    problems = [p for name, record in sorted(recorded.items()) if (p := part_problem(stage_dir / name, record))]
    on_disk = {p.relative_to(stage_dir).as_posix() for p in io.kept_parts(stage_dir) + io.removed_parts(stage_dir)}
    problems += [f"{stage_dir / name}: not written by this stage" for name in sorted(on_disk - set(recorded))]
    return problems
