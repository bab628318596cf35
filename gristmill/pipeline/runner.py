"""Run a workflow DAG on Dask: dependency order, resume, progress, conservation, manifests.

For every stage the runner decides whether it is already done (`_DONE.json` with the same config
hash and input fingerprint), prepares its folder (kept for resume when `_STARTED.json` matches,
wiped otherwise), runs it, checks that no document was lost (rows in == kept + removed), and
writes `stats.json` then `_DONE.json`, last and atomically.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gristmill import __version__
from gristmill.pipeline import integrity, io, storage
from gristmill.pipeline.lock import run_lock
from gristmill.pipeline.stage import (
    STAGE_TYPES,
    PartitionOutput,
    StageContext,
    StageResult,
    StageType,
    UpstreamInput,
    merge_stats,
)
from gristmill.pipeline.workflow import Workflow, WorkflowError, load_workflow, resolve_input_path


class StageError(RuntimeError):
    """A stage failed; the message names the stage and what went wrong."""


class ConservationError(StageError):
    """A stage lost or invented documents: rows in != kept + removed."""


# ---------------------------------------------------------------------------------------------
# Per-partition work (runs on Dask workers)


def _part_state_path(stage_dir: Path, index: int) -> Path:
    return stage_dir / io.PARTS_STATE_DIR / io.part_name(index).replace(".parquet", ".json")


def _write_partition(stage_dir: Path, index: int, output: PartitionOutput, rows_in: int, started: float,
                     config: Any) -> dict:
    """Write one unit's kept and removed documents as parts within the stage's caps, then its state."""
    caps = (config.max_part_rows, config.max_part_bytes)
    written = {
        io.KEPT: io.write_parts(output.kept, stage_dir / io.KEPT, index, *caps),
        io.REMOVED: io.write_parts(output.removed, stage_dir / io.REMOVED, index, *caps),
    }
    state = {
        "part": io.part_name(index),
        "kept_parts": written[io.KEPT],
        "removed_parts": written[io.REMOVED],
        "in": rows_in,
        "kept": output.kept.num_rows,
        "removed": output.removed.num_rows,
        "seconds": round(time.perf_counter() - started, 4),
        "stats": output.stats,
        "parts": {
            f"{sub}/{name}": integrity.part_record(stage_dir / sub / name)
            for sub, names in written.items()
            for name in names
        },
    }
    io.write_json_atomic(state, _part_state_path(stage_dir, index))
    return state


def _finished_part(stage_dir: Path, index: int) -> dict | None:
    """The state of a part a previous attempt finished, if its files are still the ones it wrote."""
    state = io.read_json(_part_state_path(stage_dir, index))
    if state is None:
        return None
    if any(integrity.part_problem(stage_dir / name, record) for name, record in state.get("parts", {}).items()):
        return None
    return state


def process_document_part(
    item: tuple[int, str], fn: Callable, config: Any, stage_name: str, stage_dir: str
) -> dict:
    """Apply a document stage to one input part; skip it when a previous attempt finished it."""
    index, in_path = item
    stage_path = storage.location(stage_dir)
    done = _finished_part(stage_path, index)
    if done is not None:
        return done
    started = time.perf_counter()
    try:
        table = io.without_pii_originals(storage.read_parquet(in_path))  # they stay in the pii stage's folder
    except pa.ArrowException as error:
        raise StageError(f"stage {stage_name!r}: cannot read part {in_path}: {error}") from None
    output = fn(table, config)
    if output.kept.num_rows + output.removed.num_rows != table.num_rows:
        raise ConservationError(
            f"stage {stage_name!r}, part {in_path}: {table.num_rows} rows in but "
            f"{output.kept.num_rows} kept + {output.removed.num_rows} removed"
        )
    return _write_partition(stage_path, index, output, table.num_rows, started, config)


def process_source_unit(item: tuple[int, Any], fn: Callable, config: Any, stage_dir: str) -> dict:
    """Turn one source unit (file, group of files) into a part; skip it when already finished."""
    index, unit = item
    stage_path = storage.location(stage_dir)
    done = _finished_part(stage_path, index)
    if done is not None:
        return done
    started = time.perf_counter()
    output = fn(unit, config)
    rows = output.kept.num_rows + output.removed.num_rows
    return _write_partition(stage_path, index, output, rows, started, config)


# ---------------------------------------------------------------------------------------------
# Executing on Dask


@contextmanager
def dask_client(workflow: Workflow, scheduler: str | None, console: Console) -> Iterator[Any]:
    """A distributed.Client for the run, or None for the synchronous scheduler."""
    settings = workflow.dask
    address = scheduler or settings.scheduler
    if address == "synchronous":
        yield None
        return
    from distributed import Client, LocalCluster

    if address or settings.scheduler_file:
        client = Client(address) if address else Client(scheduler_file=os.path.expanduser(settings.scheduler_file))
        address = address or client.scheduler.address
        link = client.dashboard_link if client.scheduler_info().get("services", {}).get("dashboard") else None
        console.print(f"[dim]dask: connected to {address}" + (f", dashboard {link}" if link else "") + "[/dim]")
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = settings.n_workers or max(1, os.cpu_count() or 1)
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=settings.threads_per_worker,
        processes=True,
        memory_limit=settings.memory_limit,
        dashboard_address=settings.dashboard_address,
        silence_logs=40,
    )
    client = Client(cluster)
    link = client.dashboard_link if settings.dashboard_address else None
    console.print(f"[dim]dask: LocalCluster of {n_workers} workers" + (f", dashboard {link}" if link else "") + "[/dim]")
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def make_mapper(client: Any, console: Console) -> Callable[[Callable, list, str], list]:
    """A function that maps `fn` over items on the cluster, in order, with a progress bar."""

    def run_map(fn: Callable, items: list, description: str) -> list:
        results: list[Any] = [None] * len(items)
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not items,
        ) as progress:
            task = progress.add_task(description, total=len(items))
            if client is None:
                for i, item in enumerate(items):
                    results[i] = fn(item)
                    progress.advance(task)
                return results
            from distributed import as_completed

            futures = client.map(fn, items, pure=False)
            position = {future.key: i for i, future in enumerate(futures)}
            try:
                for future in as_completed(futures):
                    results[position[future.key]] = future.result()
                    progress.advance(task)
            except BaseException:
                client.cancel(futures)
                raise
        return results

    return run_map


# ---------------------------------------------------------------------------------------------
# Stage bookkeeping


def config_hash(workflow: Workflow, stage: str) -> str:
    return io.stable_hash(workflow.stages[stage].model_dump(mode="json"))


def input_fingerprint(workflow: Workflow, stage: str, run_dir: Path) -> str:
    """What the stage reads: upstream stages' output fingerprints and path inputs' file stats."""
    parts = []
    for entry in workflow.stages[stage].references():
        if entry in workflow.stages:
            done = io.read_json(run_dir / entry / io.DONE_FILE)
            if done is None:
                raise StageError(f"stage {stage!r} needs stage {entry!r}, which has not finished")
            problems = integrity.output_problems(run_dir / entry, done)
            if problems:
                raise StageError(
                    f"stage {stage!r} needs stage {entry!r}, whose output changed since it finished "
                    f"(run {entry!r} again):\n  " + "\n  ".join(problems)
                )
            parts.append(["stage", entry, done["output_fingerprint"]])
        else:
            files = io.expand_paths(str(resolve_input_path(entry, workflow.directory)))
            parts.append(["path", entry, io.files_fingerprint(files)])
    return io.stable_hash(parts)


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import pyarrow

    return {
        "gristmill": __version__,
        "python": platform.python_version(),
        "dask": dask.__version__,
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
    }


def is_done(stage_dir: Path, cfg_hash: str, in_fingerprint: str) -> bool:
    """Finished with this config and input, and its parts are still the ones it wrote."""
    done = io.read_json(stage_dir / io.DONE_FILE)
    return (
        bool(done)
        and done.get("config_hash") == cfg_hash
        and done.get("input_fingerprint") == in_fingerprint
        and not integrity.output_problems(stage_dir, done)
    )


def prepare_stage_dir(stage_dir: Path, run_dir: Path, started: dict, resume: bool) -> bool:
    """Keep the folder of an interrupted attempt with the same config and input (resume), else
    start clean. Returns whether finished work is being reused."""
    previous = io.read_json(stage_dir / io.STARTED_FILE)
    reuse = (
        resume
        and previous is not None
        and previous.get("config_hash") == started["config_hash"]
        and previous.get("input_fingerprint") == started["input_fingerprint"]
    )
    if stage_dir.exists() and not reuse:
        io.remove_tree_inside(stage_dir, run_dir)
    if not storage.is_remote(stage_dir):  # object stores have no folders
        stage_dir.mkdir(parents=True, exist_ok=True)
    for stale in (io.DONE_FILE, io.FAILED_FILE):
        io.remove_file(stage_dir / stale)
    io.write_json_atomic(started, stage_dir / io.STARTED_FILE)
    return reuse


def _stage_inputs(workflow: Workflow, stage: str, run_dir: Path) -> list[UpstreamInput]:
    inputs = []
    for entry in workflow.stages[stage].input:
        if entry in workflow.stages:
            inputs.append(UpstreamInput(entry, run_dir / entry, workflow.stages[entry].type))
        else:
            files = io.expand_paths(str(resolve_input_path(entry, workflow.directory)))
            inputs.append(UpstreamInput(entry, files=files))
    return inputs


def _run_partitioned(spec: StageType, ctx: StageContext) -> StageResult:
    """Document and source stages: one task per part or unit, then merged counts and stats."""
    if spec.kind == "document":
        parts = ctx.input_parts()
        task = functools.partial(
            process_document_part, fn=spec.map_partition, config=ctx.config,
            stage_name=ctx.name, stage_dir=str(ctx.stage_dir),
        )
        items = [(i, str(p)) for i, p in enumerate(parts)]
    else:
        units = spec.list_units(ctx)
        task = functools.partial(process_source_unit, fn=spec.read_unit, config=ctx.config, stage_dir=str(ctx.stage_dir))
        items = list(enumerate(units))
    states = ctx.map(task, items, ctx.name)
    counts = {
        "in": sum(s["in"] for s in states),
        "kept": sum(s["kept"] for s in states),
        "removed": sum(s["removed"] for s in states),
        "parts": sum(len(s["kept_parts"]) for s in states),
    }
    stats = {"units": len(states), **merge_stats(s["stats"] for s in states)}
    if spec.finalize_stats is not None:
        stats = spec.finalize_stats(stats, ctx.config)
    return StageResult(counts=counts, stats=stats)


def check_conservation(stage: str, stage_dir: Path, rows_in: int) -> dict[str, int]:
    """Count what is on disk and fail loudly when documents went missing or appeared."""
    kept = io.count_rows(io.kept_parts(stage_dir))
    removed = io.count_rows(io.removed_parts(stage_dir))
    if kept + removed != rows_in:
        raise ConservationError(
            f"stage {stage!r}: {rows_in} documents in but {kept} kept + {removed} removed on disk "
            f"({rows_in - kept - removed:+d} unaccounted for)"
        )
    return {"in": rows_in, "kept": kept, "removed": removed}


def run_stage(workflow: Workflow, stage: str, run_dir: Path, mapper: Callable, client: Any, resume: bool,
              console: Console) -> dict:
    """Run one stage to completion and return its `_DONE.json` record."""
    config = workflow.stages[stage]
    spec = STAGE_TYPES[config.type]
    stage_dir = run_dir / stage
    if storage.is_remote(run_dir) and not spec.object_storage:
        raise StageError(
            f"stage {stage!r} ({config.type}) writes its folder on local disk only, and the run folder "
            f"{run_dir} is on object storage: run this stage with a local --runs-dir (a crawl's WARC files "
            "can then be an `extract` input from anywhere)"
        )
    cfg_hash = config_hash(workflow, stage)
    in_fp = input_fingerprint(workflow, stage, run_dir)
    started = {
        "stage": stage,
        "type": config.type,
        "config_hash": cfg_hash,
        "input_fingerprint": in_fp,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "pid": os.getpid(),
    }
    resumed = prepare_stage_dir(stage_dir, run_dir, started, resume)
    ctx = StageContext(
        name=stage,
        config=config,
        stage_dir=stage_dir,
        run_dir=run_dir,
        workflow_dir=workflow.directory,
        inputs=_stage_inputs(workflow, stage, run_dir),
        mapper=mapper,
        client=client,
    )
    t0 = time.perf_counter()
    try:
        if spec.kind == "custom":
            rows_in = io.count_rows(ctx.input_parts()) if spec.produces_documents else None
            result = spec.run(ctx)
        else:
            result = _run_partitioned(spec, ctx)
            rows_in = result.counts["in"]
        counts = dict(result.counts)
        if spec.produces_documents:
            counts.update(check_conservation(stage, stage_dir, rows_in))
    except Exception as error:
        io.write_json_atomic(
            {"stage": stage, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
             "failed_at": datetime.now(timezone.utc).isoformat()},
            stage_dir / io.FAILED_FILE,
        )
        if isinstance(error, StageError):
            raise
        raise StageError(f"stage {stage!r} ({config.type}) failed: {type(error).__name__}: {error}") from error
    wall = round(time.perf_counter() - t0, 3)
    parts = integrity.output_records(stage_dir) if spec.produces_documents else None
    stats = {"stage": stage, "type": config.type, "counts": counts, "wall_time_s": wall, "resumed": resumed,
             **result.stats}
    io.write_json_atomic(stats, stage_dir / io.STATS_FILE)
    done = {
        "stage": stage,
        "type": config.type,
        "config_hash": cfg_hash,
        "input_fingerprint": in_fp,
        "output_fingerprint": io.stable_hash([config.type, cfg_hash, in_fp, parts]),
        "counts": counts,
        "parts": parts,
        "wall_time_s": wall,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
    }
    io.write_json_atomic(done, stage_dir / io.DONE_FILE)
    return done


def stages_to_run(
    workflow: Workflow, only: str | None, from_stage: str | None, until: str | None = None
) -> tuple[list[str], set[str]]:
    """The stages to consider, in order, and those forced to run again."""
    for flag, name in (("--only", only), ("--from", from_stage), ("--until", until)):
        if name is not None and name not in workflow.stages:
            raise WorkflowError(f"{flag} {name!r}: {workflow.path} has no such stage (stages: {', '.join(workflow.stages)})")
    if only is not None:
        return [only], {only}
    order = workflow.upstream(until) if until is not None else workflow.order()
    if from_stage is not None:
        return order, set(workflow.downstream(from_stage)) & set(order)
    return order, set()


def run_workflow(
    workflow: Workflow | str | os.PathLike,
    runs_dir: str | os.PathLike = "runs",
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    only: str | None = None,
    from_stage: str | None = None,
    until: str | None = None,
    scheduler: str | None = None,
    console: Console | None = None,
    force_unlock: bool = False,
) -> Path:
    """Run (or resume) a workflow and return its run folder `runs_dir/<workflow name>`, holding the
    folder's lock throughout (`force_unlock` breaks the lock of a dead holder, see lock.py)."""
    console = console or Console(stderr=True)
    if not isinstance(workflow, Workflow):
        workflow = load_workflow(workflow, overrides)
    run_dir = storage.location(runs_dir) / workflow.name
    storage.check_writable(run_dir)
    order, forced = stages_to_run(workflow, only, from_stage, until)
    if force:
        forced = set(order)
    with run_lock(run_dir, force_unlock), dask_client(workflow, scheduler, console) as client:
        io.remove_temporaries(run_dir)  # left by a killed run; nothing else writes here while locked
        io.write_bytes_atomic(
            yaml.safe_dump(workflow.raw, sort_keys=False, allow_unicode=True).encode(), run_dir / "workflow.yaml"
        )
        console.print(f"[bold]gristmill[/bold] run [cyan]{workflow.name}[/cyan] -> {escape(str(run_dir))}")
        mapper = make_mapper(client, console)
        for stage in order:
            stage_dir = run_dir / stage
            if stage not in forced and is_done(stage_dir, config_hash(workflow, stage),
                                               input_fingerprint(workflow, stage, run_dir)):
                console.print(f"[green]✓[/green] {stage} [dim](done, skipped)[/dim]")
                continue
            console.print(f"[bold]▶ {stage}[/bold] [dim]({workflow.stages[stage].type})[/dim]")
            damaged = integrity.output_problems(stage_dir, io.read_json(stage_dir / io.DONE_FILE) or {})
            for problem in damaged:
                console.print(f"  [yellow]output changed, redoing the stage:[/yellow] {escape(problem)}")
            resume = stage not in forced and not damaged
            done = run_stage(workflow, stage, run_dir, mapper, client, resume=resume, console=console)
            counts = ", ".join(f"{k} {v:,}" for k, v in done["counts"].items())
            console.print(f"[green]✓[/green] {stage}: {counts} [dim]in {done['wall_time_s']:.1f}s[/dim]")
    return run_dir
