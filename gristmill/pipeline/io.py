"""Run-folder paths and atomic writes: the on-disk contract between stages (DESIGN.md).

Every file a stage leaves behind is written under a temporary name and renamed into place, so a
killed run never leaves a half-written part that looks whole. A run folder on object storage has
no rename: there a file is published by a marker written after its upload (storage.py), and the
readers here list and trust only published files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gristmill.pipeline import storage

KEPT = "kept"
REMOVED = "removed"
STATS_FILE = "stats.json"
DONE_FILE = "_DONE.json"
STARTED_FILE = "_STARTED.json"
FAILED_FILE = "_FAILED.json"
PARTS_STATE_DIR = "_parts"

# The columns every document carries (DESIGN.md); stages may add their own signal columns.
DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("fetch_time", pa.timestamp("us", tz="UTC")),
        ("lang", pa.string()),
        ("lang_score", pa.float64()),
    ]
)


def part_name(index: int, piece: int | None = None) -> str:
    """`part-00007.parquet`: parts are numbered by their position in the stage's input. A unit whose
    output is over the part caps writes pieces, `part-00007-0000.parquet`, `part-00007-0001.parquet`,
    which sort between `part-00006` and `part-00008`, so name order is still input order."""
    return f"part-{index:05d}.parquet" if piece is None else f"part-{index:05d}-{piece:04d}.parquet"


def split_table(table: pa.Table, max_rows: int | None, max_bytes: int | None) -> list[pa.Table]:
    """`table` cut, in order, into slices of at most `max_rows` rows and `max_bytes` bytes of Arrow
    memory each (a single row larger than `max_bytes` is a slice of its own); at least one slice."""
    max_rows = max_rows or max(table.num_rows, 1)
    slices: list[pa.Table] = []
    start = 0
    while start < table.num_rows or not slices:
        end = min(start + max_rows, table.num_rows)
        if max_bytes is not None and table.slice(start, end - start).nbytes > max_bytes:
            low, high = start + 1, end  # slice bytes grow with its end: binary search the longest that fits
            while low < high:
                middle = (low + high + 1) // 2
                if table.slice(start, middle - start).nbytes <= max_bytes:
                    low = middle
                else:
                    high = middle - 1
            end = low
        slices.append(table.slice(start, end - start))
        start = end
    return slices


def write_parts(table: pa.Table, folder: str | os.PathLike, index: int, max_rows: int | None,
                max_bytes: int | None) -> list[str]:
    """Write `table` as part `index` of `folder`, in pieces when it is over the caps; returns the
    part names, in order."""
    slices = split_table(table, max_rows, max_bytes)
    names = [part_name(index)] if len(slices) == 1 else [part_name(index, i) for i in range(len(slices))]
    for name, piece in zip(names, slices):
        write_parquet_atomic(piece, storage.location(folder) / name)
    return names


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files (remote: the unpublished parts) that killed writers left anywhere
    under `folder`; call it only while no one else writes there (the run lock). Returns how many."""
    where = storage.location(folder)
    if storage.is_remote(where):
        return storage.remove_unpublished(where)
    removed = 0
    for path in Path(folder).rglob(".*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write `table` as zstd Parquet at `path`, visible only once complete."""
    path = storage.location(path)
    if storage.is_remote(path):
        with storage.publishing(path) as handle:
            pq.write_table(table, handle, compression="zstd")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON at `path`, visible only once complete."""
    return write_bytes_atomic((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write raw bytes at `path`, visible only once complete."""
    path = storage.location(path)
    if storage.is_remote(path):
        with storage.publishing(path) as handle:
            handle.write(data)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def remove_tree_inside(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Delete the folder `path`, refusing (ValueError) unless it lies strictly inside `root`: the
    runner only ever deletes inside a run folder, whatever a workflow calls its stages."""
    target, base = storage.location(path), storage.location(root)
    if storage.is_remote(target):
        if not str(target).startswith(str(base).rstrip("/") + "/"):
            raise ValueError(f"refusing to delete {path}: it is outside the run folder {root}")
        storage.remove_tree(target)
        return
    target, base = Path(path).resolve(), Path(root).resolve()
    if base not in target.parents:
        raise ValueError(f"refusing to delete {path}: it resolves to {target}, outside the run folder {base}")
    shutil.rmtree(target)


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed JSON at `path`, or None when the file does not exist (remote: is not published)."""
    path = storage.location(path)
    if storage.is_remote(path) and not storage.is_published(path):
        return None
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def remove_file(path: str | os.PathLike) -> None:
    """Delete a file if it exists (remote: its marker first, so it is never trusted half deleted)."""
    path = storage.location(path)
    if storage.is_remote(path):
        for target in (storage.marker(path), path):
            if target.fs.exists(target.path):
                target.fs.rm_file(target.path)
        return
    path.unlink(missing_ok=True)


def list_parts(folder: str | os.PathLike) -> list[Path]:
    """The complete Parquet parts in `folder`, in name order (temporary and unpublished files are
    hidden)."""
    return storage.published_files(storage.location(folder), "*.parquet")


def kept_parts(stage_dir: str | os.PathLike) -> list[Path]:
    return list_parts(storage.location(stage_dir) / KEPT)


def removed_parts(stage_dir: str | os.PathLike) -> list[Path]:
    return list_parts(storage.location(stage_dir) / REMOVED)


def count_rows(paths: list[Path]) -> int:
    """Total rows of Parquet files, read from their footers only."""
    return sum(storage.parquet_file(p).metadata.num_rows for p in paths)


def expand_paths(pattern: str) -> list[Path]:
    """Files matching a path or glob (`**` allowed), sorted; a folder means every file under it.
    An fsspec URL (`s3://bucket/crawl/*.warc.gz`) is expanded by its back-end."""
    if storage.is_url(pattern):
        return storage.expand(pattern)
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files: list[Path] = []
    for match in matches:
        p = Path(match)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
    return files


def files_fingerprint(paths: list[Path]) -> str:
    """A cheap fingerprint of input files: path, size and modification time of each."""
    h = hashlib.sha256()
    for p in paths:
        if storage.is_remote(p):
            h.update(storage.fingerprint_entry(p).encode())
            continue
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stable_hash(obj: Any) -> str:
    """A short hash of any JSON-serialisable value, independent of key order."""
    payload = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def document_id(source: str, position: int | str) -> str:
    """A stable document id from where it came from: the same input gives the same id every run."""
    return hashlib.blake2b(f"{source}\0{position}".encode(), digest_size=10).hexdigest()


def with_reason(table: pa.Table, reason: str | list[str]) -> pa.Table:
    """`table` with a `reason` column (one reason for all rows, or one per row), for removed/."""
    if isinstance(reason, str):
        reason = [reason] * table.num_rows
    column = pa.array(reason, type=pa.string())
    if "reason" in table.column_names:
        return table.set_column(table.schema.get_field_index("reason"), "reason", column)
    return table.append_column("reason", column)


def without_pii_originals(table: pa.Table) -> pa.Table:
    """`table` with `pii_spans[].original` (the strings the pii stage replaced) set to null, type
    unchanged: those strings stay in the pii stage's own folder unless an export asks for them."""
    if "pii_spans" not in table.column_names:
        return table
    spans = table.column("pii_spans").combine_chunks()
    entries = spans.values
    if "original" not in [field.name for field in entries.type]:
        return table
    fields = list(entries.type)
    children = [
        pa.nulls(len(entries), field.type) if field.name == "original" else entries.field(field.name)
        for field in fields
    ]
    scrubbed = pa.StructArray.from_arrays(children, fields=fields, mask=entries.is_null())
    column = pa.ListArray.from_arrays(spans.offsets, scrubbed, mask=spans.is_null())
    return table.set_column(table.schema.get_field_index("pii_spans"), "pii_spans", column)


def empty_documents(extra: pa.Schema | None = None) -> pa.Table:
    """An empty table with the document schema (plus `extra` columns)."""
    schema = DOCUMENT_SCHEMA
    if extra is not None:
        for field in extra:
            schema = schema.append(field)
    return schema.empty_table()
