"""Stage types: a config model plus one function, registered by name.

Three shapes of stage exist, one decorator each:

- `document_stage`: a pure function over one Parquet part,
  `fn(table: pa.Table, config) -> PartitionOutput`. The runner maps it over the kept parts of the
  upstream stages on Dask, writes `kept/` and `removed/` part for part, merges the stats and
  checks conservation (rows in == kept + removed).
- `source_stage`: documents made from files or the outside world. `units(ctx) -> list` says what
  the work items are (files, groups of files); `fn(unit, config) -> PartitionOutput` turns one
  unit into documents. A record that cannot be read becomes a `removed` row with its reason.
- `custom_stage`: anything else (dedup's global shuffle, tokenizer training, packing, training),
  `fn(ctx: StageContext) -> StageResult`. A custom stage that writes `kept/`/`removed/` declares
  `produces_documents=True` and the runner checks conservation against its input parts; one that
  works on a run folder in object storage declares `object_storage=True`.

A new stage type is one module: its config model (a `StageConfig` subclass) and its function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from gristmill.pipeline import io


class StageConfig(BaseModel):
    """Settings every stage has; each stage type subclasses it with its own keys.

    Unknown keys are errors (`extra="forbid"`), so a typo never silently falls back to a default.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    input: list[str] = []
    # Caps on every part the stage writes (rows, and bytes of Arrow memory); unset means the
    # workflow's `parts:` defaults. Stages that write no document parts do not take them.
    max_part_rows: int | None = Field(default=None, ge=1)
    max_part_bytes: ByteSize | None = Field(default=None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def has_own_source(self) -> bool:
        """Whether settings other than `input` name what the stage reads (extract's `commoncrawl`)."""
        return False

    def references(self) -> list[str]:
        """Every stage or path this stage reads: `input`, plus the entries of any other key a stage
        type reads from (classify's `positives`); the DAG orders and fingerprints all of them."""
        return list(self.input)

    def own_settings(self) -> dict[str, Any]:
        """The keys of the stage type itself, without those every stage has (type, input, part caps)."""
        return self.model_dump(exclude=set(StageConfig.model_fields))


@dataclass
class PartitionOutput:
    """What a stage did to one partition: the documents kept, those removed, and its counters."""

    kept: pa.Table
    removed: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What a custom stage reports to the runner for `stats.json` and `_DONE.json`.

    `counts` holds at least `in`, `kept`, `removed` for stages that produce documents; other
    stages report what they count (tokens, shards, steps).
    """

    counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class UpstreamInput:
    """One entry of a stage's `input`: an upstream stage's folder, or files matched by a path."""

    name: str
    stage_dir: Path | None = None
    stage_type: str | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def is_stage(self) -> bool:
        return self.stage_dir is not None


@dataclass
class StageContext:
    """Everything a stage function may use: its config, its folder, its inputs, and a way to map
    work over the Dask cluster with a progress bar."""

    name: str
    config: StageConfig
    stage_dir: Path
    run_dir: Path
    workflow_dir: Path
    inputs: list[UpstreamInput]
    mapper: Callable[..., list[Any]]
    client: Any = None  # distributed.Client, or None with the synchronous scheduler

    def input_parts(self) -> list[Path]:
        """Parquet document parts this stage reads: upstream stages' `kept/` parts, then any
        Parquet files named by path, in `input` order."""
        parts: list[Path] = []
        for entry in self.inputs:
            if entry.is_stage:
                parts.extend(io.kept_parts(entry.stage_dir))
            else:
                parts.extend(p for p in entry.files if p.suffix == ".parquet")
        return parts

    def input_files(self) -> list[Path]:
        """Every file named by path inputs (not upstream stages), in `input` order."""
        return [p for entry in self.inputs if not entry.is_stage for p in entry.files]

    def upstream_dirs(self, stage_type: str | None = None) -> list[Path]:
        """Folders of upstream stages, optionally only those of one stage type."""
        return [
            e.stage_dir
            for e in self.inputs
            if e.is_stage and (stage_type is None or e.stage_type == stage_type)
        ]

    def reference(self, entry: str) -> UpstreamInput:
        """An entry of a key other than `input` (see `StageConfig.references`): a finished stage of
        this run, else the files a path or glob matches, relative to the workflow's folder."""
        stage_dir = self.run_dir / entry
        if (stage_dir / io.DONE_FILE).is_file():
            return UpstreamInput(entry, stage_dir, (io.read_json(stage_dir / io.DONE_FILE) or {}).get("type"))
        path = Path(entry).expanduser()
        return UpstreamInput(entry, files=io.expand_paths(str(path if path.is_absolute() else self.workflow_dir / path)))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], description: str | None = None) -> list[Any]:
        """`[fn(item) for item in items]` on the cluster, in order, with a progress bar."""
        return self.mapper(fn, list(items), description or self.name)


StatsFinalizer = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass
class StageType:
    """A registered stage type; exactly one of the three functions is set."""

    name: str
    config_model: type[StageConfig]
    map_partition: Callable[[pa.Table, Any], PartitionOutput] | None = None
    read_unit: Callable[[Any, Any], PartitionOutput] | None = None
    list_units: Callable[[StageContext], list[Any]] | None = None
    run: Callable[[StageContext], StageResult] | None = None
    finalize_stats: StatsFinalizer | None = None
    produces_documents: bool = True
    needs_input: bool = True
    object_storage: bool = True  # can run with its run folder on object storage (storage.py)

    @property
    def kind(self) -> str:
        if self.map_partition is not None:
            return "document"
        if self.read_unit is not None:
            return "source"
        return "custom"


STAGE_TYPES: dict[str, StageType] = {}


def _register(stage_type: StageType) -> None:
    if stage_type.name in STAGE_TYPES and STAGE_TYPES[stage_type.name] != stage_type:
        existing = STAGE_TYPES[stage_type.name]
        same_origin = (
            existing.config_model.__qualname__ == stage_type.config_model.__qualname__
            and existing.config_model.__module__ == stage_type.config_model.__module__
        )
        if not same_origin:
            raise ValueError(f"stage type {stage_type.name!r} is registered twice")
    STAGE_TYPES[stage_type.name] = stage_type


def document_stage(name: str, config_model: type[StageConfig], finalize_stats: StatsFinalizer | None = None):
    """Register `fn(table, config) -> PartitionOutput` as the stage type `name`."""

    def decorate(fn):
        _register(StageType(name, config_model, map_partition=fn, finalize_stats=finalize_stats))
        return fn

    return decorate


def source_stage(
    name: str,
    config_model: type[StageConfig],
    units: Callable[[StageContext], list[Any]],
    finalize_stats: StatsFinalizer | None = None,
    needs_input: bool = True,
):
    """Register `fn(unit, config) -> PartitionOutput` as the stage type `name`; `units(ctx)`
    lists the work items (each must pickle: paths, tuples, small dicts)."""

    def decorate(fn):
        _register(
            StageType(
                name,
                config_model,
                read_unit=fn,
                list_units=units,
                finalize_stats=finalize_stats,
                needs_input=needs_input,
            )
        )
        return fn

    return decorate


def custom_stage(
    name: str,
    config_model: type[StageConfig],
    produces_documents: bool = False,
    needs_input: bool = True,
    object_storage: bool = False,
):
    """Register `fn(ctx) -> StageResult` as the stage type `name`. `object_storage=True` declares
    that it reads and writes its folder only through `io`/`storage`, so the folder may be remote."""

    def decorate(fn):
        _register(
            StageType(
                name,
                config_model,
                run=fn,
                produces_documents=produces_documents,
                needs_input=needs_input,
                object_storage=object_storage,
            )
        )
        return fn

    return decorate


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-partition stats: numbers add up, dicts merge key by key, numeric lists of equal
    length add element-wise (histogram `counts`), a list under the key `edges` is kept as is
    (histogram bin edges), other lists concatenate (samples). Booleans and strings: last wins."""
    merged: dict[str, Any] = {}
    for stats in parts:
        _merge_into(merged, stats)
    return merged


def _merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if key not in target:
            target[key] = _copy(value)
        elif key == "edges":
            continue
        elif isinstance(value, dict) and isinstance(target[key], dict):
            _merge_into(target[key], value)
        elif isinstance(value, bool) or isinstance(target[key], bool):
            target[key] = value
        elif isinstance(value, (int, float)) and isinstance(target[key], (int, float)):
            target[key] = target[key] + value
        elif isinstance(value, list) and isinstance(target[key], list):
            if len(value) == len(target[key]) and all(isinstance(v, (int, float)) for v in value + target[key]):
                target[key] = [a + b for a, b in zip(target[key], value)]
            else:
                target[key] = target[key] + list(value)
        else:
            target[key] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def group_by_size(items: Iterable[Any], size: Callable[[Any], int], target: int,
                  max_items: int | None = None) -> list[list[Any]]:
    """Consecutive items gathered into work units of at most `target` total size (an item bigger
    than `target` is a unit of its own) and at most `max_items` items: many small input files
    make a few tasks worth scheduling, in input order."""
    units: list[list[Any]] = []
    current: list[Any] = []
    current_size = 0
    for item in items:
        item_size = size(item)
        full = current_size + item_size > target or (max_items is not None and len(current) >= max_items)
        if current and full:
            units.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += item_size
    if current:
        units.append(current)
    return units
