"""The state of every stage of a run folder, read from the folder alone.

Used by `gristmill status` and the dashboard, so both tell the same story: a stage is `done`
(`_DONE.json` and its parts still the ones it wrote), `stale` (finished, but a part changed, went
missing or appeared since; `error` names each file), `failed` (`_FAILED.json`), `running` (`_STARTED.json` and its process alive),
`interrupted` (started, process gone), or `pending` (nothing on disk yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gristmill.pipeline import integrity, io, storage


@dataclass
class StageStatus:
    name: str
    type: str
    inputs: list[str]
    state: str
    counts: dict[str, int] = field(default_factory=dict)
    wall_time_s: float | None = None
    finished_at: str | None = None
    error: str | None = None


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_run_workflow(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The workflow a run used (`workflow.yaml` in the run folder), as a plain mapping."""
    path = storage.location(run_dir) / "workflow.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: not a gristmill run folder (no workflow.yaml)")
    return yaml.safe_load(path.read_text()) or {}


def stage_state(stage_dir: Path) -> tuple[str, dict]:
    """(state, the manifest that decided it) for one stage folder."""
    done = io.read_json(stage_dir / io.DONE_FILE)
    if done is not None:
        problems = integrity.output_problems(stage_dir, done)
        if problems:
            return "stale", {**done, "error": "output changed since it finished:\n  " + "\n  ".join(problems)}
        return "done", done
    failed = io.read_json(stage_dir / io.FAILED_FILE)
    if failed is not None:
        return "failed", failed
    started = io.read_json(stage_dir / io.STARTED_FILE)
    if started is not None:
        return ("running" if _process_alive(started.get("pid")) else "interrupted"), started
    return "pending", {}


def run_status(run_dir: str | os.PathLike) -> list[StageStatus]:
    """One StageStatus per stage of the run's workflow, in file order."""
    run_dir = storage.location(run_dir)
    workflow = read_run_workflow(run_dir)
    statuses = []
    for name, settings in (workflow.get("stages") or {}).items():
        settings = settings or {}
        inputs = settings.get("input") or []
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        state, manifest = stage_state(run_dir / name)
        statuses.append(
            StageStatus(
                name=name,
                type=str(settings.get("type")),
                inputs=inputs,
                state=state,
                counts=manifest.get("counts", {}) if state in ("done", "stale") else {},
                wall_time_s=manifest.get("wall_time_s"),
                finished_at=manifest.get("finished_at"),
                error=manifest.get("error"),
            )
        )
    return statuses
