"""Everything the dashboard reads from a run folder, cached and sampled so large runs stay responsive.

Cached readers take a file signature (path, modification time, size) as an argument, so a cache
entry is reused until the file changes on disk and a stage that is still writing is re-read. Pages
read only the Parquet columns they need, and sample rows through the footers' row-group index
rather than loading whole tables.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import streamlit as st

from gristmill.pipeline import io, storage
from gristmill.pipeline.status import StageStatus, run_status, stage_state

Signature = tuple[tuple[str, int, int], ...]


def discover_runs(path: str | os.PathLike) -> list[Path]:
    """The run folders at `path`: the folder itself when it holds `workflow.yaml`, else its
    sub-folders that do (sorted by name)."""
    path = storage.location(path)
    if (path / "workflow.yaml").is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if (p / "workflow.yaml").is_file())


def signature(paths: list[Path]) -> Signature:
    """(path, change tag, size) of each existing file: the cache key of everything read from them
    (the tag is the mtime locally, the ETag's hash on object storage)."""
    out = []
    for p in paths:
        try:
            tag, size = storage.stamp(storage.location(p))
        except FileNotFoundError:
            continue
        out.append((str(p), tag, size))
    return tuple(out)


class UnreadableFile(ValueError):
    """A run file that exists but cannot be parsed (half-written or damaged)."""


@st.cache_data(show_spinner=False, max_entries=512)
def _read_json(sig: Signature) -> Any:
    (path, _, _), = sig
    try:
        return json.loads(storage.location(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{path}: not valid JSON ({error})") from None


def read_json(path: Path) -> Any | None:
    """Parsed JSON at `path` (cached on its mtime); None when missing; UnreadableFile when broken."""
    sig = signature([path])
    return _read_json(sig) if sig else None


@st.cache_data(show_spinner=False, max_entries=64)
def _read_jsonl(sig: Signature) -> list[dict]:
    (path, _, _), = sig
    records = []
    for line in storage.location(path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a log that is being appended to
    return records


def read_jsonl(path: Path) -> list[dict]:
    """The JSON records of a `.jsonl` log, skipping a half-written last line; [] when missing."""
    sig = signature([path])
    return _read_jsonl(sig) if sig else []


@dataclass
class StageView:
    """One stage of a run as a page sees it: where it is, its state and its manifests."""

    status: StageStatus
    dir: Path

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def state(self) -> str:
        return self.status.state

    def stats(self) -> dict:
        """`stats.json` ({} when absent); UnreadableFile when half-written."""
        return read_json(self.dir / io.STATS_FILE) or {}

    def failure(self) -> dict:
        return read_json(self.dir / io.FAILED_FILE) or {}

    def parts(self, which: str = io.KEPT) -> list[Path]:
        return io.list_parts(self.dir / which)


def load_run(run_dir: Path) -> list[StageView]:
    """Every stage of the run with its state (from `gristmill.pipeline.status`, so the CLI agrees),
    upstream stages before downstream ones (file order among independent stages)."""
    pending = run_status(run_dir)
    names = {s.name for s in pending}
    ordered: list[StageStatus] = []
    placed: set[str] = set()
    while pending:
        ready = [s for s in pending if all(i in placed or i not in names for i in s.inputs)] or pending[:1]
        ordered.append(ready[0])
        placed.add(ready[0].name)
        pending.remove(ready[0])
    return [StageView(s, run_dir / s.name) for s in ordered]


def refresh_state(stage: StageView) -> StageView:
    """The stage with its state read again from disk (for pages that refresh while it runs)."""
    state, manifest = stage_state(stage.dir)
    status = dataclasses.replace(stage.status, state=state)
    if state == "done":
        status = dataclasses.replace(status, counts=manifest.get("counts", {}), wall_time_s=manifest.get("wall_time_s"))
    return StageView(status, stage.dir)


# ---------------------------------------------------------------------------------------------
# Parquet: columns, counts and samples


def columns_of(parts: list[Path]) -> list[str]:
    """Column names of the first part (all parts of a stage share a schema)."""
    return storage.parquet_file(parts[0]).schema_arrow.names if parts else []


@st.cache_data(show_spinner=False, max_entries=128)
def _read_columns(sig: Signature, columns: tuple[str, ...], max_rows: int) -> pa.Table:
    paths = [storage.location(p) for p, _, _ in sig]
    rng = random.Random(0)
    order = list(range(len(paths)))
    rng.shuffle(order)  # a fixed random subset of parts when the cap is reached
    pieces, rows = [], 0
    for i in order:
        available = set(storage.parquet_file(paths[i]).schema_arrow.names)
        table = storage.read_parquet(paths[i], columns=[c for c in columns if c in available])
        for c in columns:
            if c not in available:
                table = table.append_column(c, pa.nulls(table.num_rows))
        pieces.append(table.select(list(columns)))
        rows += table.num_rows
        if rows >= max_rows:
            break
    if not pieces:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(pieces, promote_options="permissive")


def read_columns(parts: list[Path], columns: list[str], max_rows: int = 500_000) -> pa.Table:
    """Only `columns` of the parts (missing ones as nulls), whole parts in a fixed random order
    until `max_rows` is reached: enough for a chart without reading a large run."""
    return _read_columns(signature(parts), tuple(columns), max_rows)


@st.cache_data(show_spinner=False, max_entries=128)
def _sample_rows(sig: Signature, columns: tuple[str, ...], k: int, seed: int,
                 where: tuple[str, str] | None, nonempty: str | None) -> pa.Table:
    paths = [storage.location(p) for p, _, _ in sig]
    test = where[0] if where else nonempty
    positions = []
    for i, p in enumerate(paths):
        if test is None:
            positions += [(i, r) for r in range(storage.parquet_file(p).metadata.num_rows)]
            continue
        if test not in storage.parquet_file(p).schema_arrow.names:
            continue
        values = storage.read_parquet(p, columns=[test]).column(test).to_pylist()
        if where:
            positions += [(i, r) for r, v in enumerate(values) if str(v) == where[1]]
        else:
            positions += [(i, r) for r, v in enumerate(values) if v]
    chosen = sorted(random.Random(seed).sample(positions, min(k, len(positions))))
    pieces = [_take(paths[i], [r for j, r in chosen if j == i], columns) for i in sorted({i for i, _ in chosen})]
    if not pieces:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(pieces, promote_options="permissive")


def _take(path: Path, rows: list[int], columns: tuple[str, ...]) -> pa.Table:
    """`rows` of one part, reading only the row groups that hold them and only `columns`."""
    file = storage.parquet_file(path)
    available = set(file.schema_arrow.names)
    wanted = [c for c in columns if c in available]
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
    starts = list(itertools.accumulate(sizes, initial=0))
    group_of = {r: bisect.bisect_right(starts, r) - 1 for r in rows}
    groups = sorted(set(group_of.values()))
    offset = dict(zip(groups, itertools.accumulate((sizes[g] for g in groups), initial=0)))
    table = file.read_row_groups(groups, columns=wanted)
    index = [offset[group_of[r]] + r - starts[group_of[r]] for r in rows]
    table = table.take(pa.array(index, pa.int64()))
    for c in columns:
        if c not in available:
            table = table.append_column(c, pa.nulls(table.num_rows))
    return table.select(list(columns))


def sample_rows(parts: list[Path], columns: list[str], k: int = 5, seed: int = 0,
                where: tuple[str, str] | None = None, nonempty: str | None = None) -> pa.Table:
    """`k` random rows (fixed by `seed`) of the parts, reading only `columns`; with
    `where=(column, value)` only rows whose column equals value, with `nonempty=column` only rows
    where that column is set and not empty (the tested column is read in full to find them)."""
    return _sample_rows(signature(parts), tuple(columns), k, seed, where, nonempty)


@st.cache_data(show_spinner=False, max_entries=64)
def _find_rows(sig: Signature, key: str, values: tuple[str, ...], columns: tuple[str, ...]) -> pa.Table:
    wanted = set(values)
    pieces = []
    for p, _, _ in sig:
        if key not in storage.parquet_file(p).schema_arrow.names:
            continue
        keys = storage.read_parquet(p, columns=[key]).column(key).to_pylist()
        rows = [r for r, v in enumerate(keys) if v in wanted]
        if rows:
            pieces.append(_take(storage.location(p), rows, columns))
    if not pieces:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(pieces, promote_options="permissive")


def find_rows(parts: list[Path], key: str, values: list[str], columns: list[str]) -> pa.Table:
    """The rows whose `key` column is one of `values` (e.g. the members of a dedup cluster)."""
    return _find_rows(signature(parts), key, tuple(values), tuple(columns))


def text_bytes(parts: list[Path]) -> int:
    """Uncompressed size of the `text` column, read from the Parquet footers only."""
    total = 0
    for p in parts:
        meta = storage.parquet_file(p).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema == "text":
                    total += group.column(c).total_uncompressed_size
    return total


def host_of(url: str | None) -> str:
    """The host of a URL, `(none)` when there is none to read."""
    if not url:
        return "(none)"
    return urlsplit(url).hostname or "(none)"


@dataclass
class Run:
    """The run a page shows, and the other runs the sidebar offers (for comparing)."""

    dir: Path
    stages: list[StageView]
    runs: list[Path]

    def stages_of_type(self, stage_type: str) -> list[StageView]:
        return [s for s in self.stages if s.status.type == stage_type]
