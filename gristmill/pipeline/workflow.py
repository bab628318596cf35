"""Workflow YAML -> a validated DAG of stages.

A workflow file names its stages; each has a `type` (a registered stage type), an `input` (upstream
stages or file paths/globs) and the settings of its type, checked by that type's pydantic model.
Every mistake is reported with the file, the stage and the key, e.g.
`workflows/web.yaml: stage 'filter', key 'gopher_quality.min_doc_words': Input should be a valid integer`.

`imports:` lists modules that register extra stage types (your own `document_stage`s).
`parts:` caps the parts every document stage writes (`max_part_rows`, `max_part_bytes`); a stage's
own keys of the same names win (docs/partitions.md).
Strings may use `${VAR}` and `${VAR:-default}`; `GRISTMILL_DATA` defaults to the bundled data folder.
`--set stage.key=value` overrides (value parsed as YAML) apply before validation.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from gristmill import DATA_DIR
from gristmill.pipeline import storage
from gristmill.pipeline.io import expand_paths
from gristmill.pipeline.registry import load_builtin_stages
from gristmill.pipeline.stage import StageConfig

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Names become folders (`runs/<workflow>/<stage>/`) that the runner deletes and rewrites, so they
# must be plain names: no separators, no `..`, nothing absolute. Stage names have no dots, so none
# can collide with a run-folder file such as `workflow.yaml`.
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
WORKFLOW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class WorkflowError(ValueError):
    """A workflow that cannot run as written; the message names the file, stage and key."""


class DaskSettings(BaseModel):
    """Where stages run. `scheduler`: unset for a LocalCluster sized to the machine,
    `synchronous` for in-process execution (debugging, small tests), or `tcp://host:port`.
    `scheduler_file`: the JSON file `dask scheduler --scheduler-file` writes (a cluster of several
    machines, dask-jobqueue, HPC launchers); it is read when the run starts."""

    model_config = ConfigDict(extra="forbid")

    scheduler: str | None = None
    scheduler_file: str | None = None

    @model_validator(mode="after")
    def _one_way_to_connect(self) -> DaskSettings:
        if self.scheduler and self.scheduler_file:
            raise ValueError("set either `scheduler` or `scheduler_file`, not both")
        return self
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard_address: str | None = ":0"


class PartLimits(BaseModel):
    """Workflow-wide caps on the parts every document stage writes (a stage may set its own).
    A unit whose output is bigger writes several parts, so downstream tasks follow the data.
    Bytes are Arrow memory, what a task holds when it reads the part; sizes such as `256MiB` work."""

    model_config = ConfigDict(extra="forbid")

    max_part_rows: int = Field(default=100_000, ge=1)  # many small documents still make tasks of a few seconds
    max_part_bytes: ByteSize = Field(default=ByteSize(256 * 2**20), ge=1)  # a part fits a worker's memory many times


class Workflow(BaseModel):
    """A validated workflow: stages in file order, each a StageConfig subclass."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    path: Path
    stages: dict[str, StageConfig]
    dask: DaskSettings = DaskSettings()
    parts: PartLimits = PartLimits()
    raw: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.path.parent

    def dependencies(self, stage: str) -> list[str]:
        """Upstream stage names of `stage`, in `input` order."""
        return [name for name in self.stages[stage].references() if name in self.stages]

    def order(self) -> list[str]:
        """Stages in dependency order (file order among independent stages)."""
        done: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, trail: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = " -> ".join(trail[trail.index(name) :] + [name])
                raise WorkflowError(f"{self.path}: stage {name!r}, key 'input': cycle {cycle}")
            state[name] = "visiting"
            for dep in self.dependencies(name):
                visit(dep, trail + [name])
            state[name] = "done"
            done.append(name)

        for name in self.stages:
            visit(name, [])
        return done

    def downstream(self, stage: str) -> list[str]:
        """`stage` and every stage that depends on it, in dependency order."""
        affected = {stage}
        for name in self.order():
            if any(dep in affected for dep in self.dependencies(name)):
                affected.add(name)
        return [name for name in self.order() if name in affected]

    def upstream(self, stage: str) -> list[str]:
        """`stage` and every stage it depends on, directly or not, in dependency order."""
        needed = {stage}
        for name in reversed(self.order()):
            if name in needed:
                needed.update(self.dependencies(name))
        return [name for name in self.order() if name in needed]


def expand_env(value: Any, where: str) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string of a parsed YAML value."""
    if isinstance(value, str):

        def substitute(match: re.Match) -> str:
            var, default = match.group(1), match.group(2)
            if var in os.environ:
                return os.environ[var]
            if var == "GRISTMILL_DATA":
                return str(DATA_DIR)
            if default is not None:
                return default
            raise WorkflowError(f"{where}: environment variable ${{{var}}} is not set and has no default")

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """Apply one `stage.key=value` (or `dask.key=value`, `parts.key=value`, `name=value`) override in place."""
    if "=" not in override:
        raise WorkflowError(f"--set {override!r}: expected STAGE.KEY=VALUE")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise WorkflowError(
            f"--set {override!r}: the value {text!r} is not valid YAML ({problem}); quote it to pass a string"
        ) from None
    if keys[0] in ("name",) and len(keys) == 1:
        raw["name"] = value
        return
    if keys[0] in ("dask", "parts"):
        target = raw.get(keys[0]) or {}
        raw[keys[0]] = target
    else:
        stages = raw.get("stages") or {}
        if keys[0] not in stages:
            raise WorkflowError(f"--set {override!r}: {path} has no stage {keys[0]!r} (stages: {', '.join(stages)})")
        target = stages[keys[0]]
    keys = keys[1:]
    if not keys:
        raise WorkflowError(f"--set {override!r}: expected STAGE.KEY=VALUE")
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise WorkflowError(f"--set {override!r}: {key!r} is not a mapping")
    target[keys[-1]] = value


def _format_validation_error(path: Path, stage: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(stage)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{path}: stage {stage!r}, key {key!r}: {message}")
    return "\n".join(lines)


def parse_workflow(raw: dict[str, Any], path: Path) -> Workflow:
    """Validate an already-loaded workflow mapping; `path` is used in messages and to resolve
    relative input paths."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise WorkflowError(f"{path}: a workflow is a mapping with 'stages'")
    unknown = set(raw) - {"name", "description", "dask", "parts", "imports", "stages"}
    if unknown:
        raise WorkflowError(
            f"{path}: unknown top-level key(s) {sorted(unknown)}; expected name, description, dask, parts, imports, stages"
        )
    raw = expand_env(raw, str(path))
    stage_types = load_builtin_stages()
    for module in raw.get("imports") or []:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise WorkflowError(f"{path}: key 'imports': cannot import {module!r}: {error}") from None
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise WorkflowError(f"{path}: 'stages' must be a non-empty mapping of stage name -> settings")

    dask_raw = raw.get("dask") or {}
    try:
        dask = DaskSettings.model_validate(dask_raw)
    except ValidationError as error:
        lines = [f"{path}: key 'dask.{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in error.errors()]
        raise WorkflowError("\n".join(lines)) from None
    try:
        parts = PartLimits.model_validate(raw.get("parts") or {})
    except ValidationError as error:
        lines = [f"{path}: key 'parts.{'.'.join(map(str, e['loc']))}': "
                 f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in error.errors()]
        raise WorkflowError("\n".join(lines)) from None

    workflow_name = str(raw.get("name") or path.stem)
    if not WORKFLOW_NAME.fullmatch(workflow_name):
        where = "key 'name'" if raw.get("name") else "the name taken from the file name (set `name:`)"
        raise WorkflowError(
            f"{path}: {where}: {workflow_name!r} is not a plain name; use letters, digits, '_', '-' and '.' "
            f"(not first), at most 100 characters"
        )

    stages: dict[str, StageConfig] = {}
    errors: list[str] = []
    for name, settings in stages_raw.items():
        if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
            errors.append(
                f"{path}: stage {name!r}: a stage name is a plain name of letters, digits, '_' and '-' "
                f"(it becomes a folder of the run), at most 100 characters"
            )
            continue
        if not isinstance(settings, dict):
            errors.append(f"{path}: stage {name!r}: settings must be a mapping")
            continue
        stage_type = settings.get("type")
        if stage_type not in stage_types:
            errors.append(
                f"{path}: stage {name!r}, key 'type': unknown stage type {stage_type!r} "
                f"(known: {', '.join(sorted(stage_types))})"
            )
            continue
        spec = stage_types[stage_type]
        try:
            config = spec.config_model.model_validate(settings)
        except ValidationError as error:
            errors.append(_format_validation_error(path, name, error))
            continue
        config, problem = _with_part_limits(config, spec.kind == "custom" and not spec.produces_documents, parts)
        if problem:
            errors.append(f"{path}: stage {name!r}, {problem}")
        if spec.needs_input and not config.input and not config.has_own_source():
            errors.append(f"{path}: stage {name!r}, key 'input': stage type {stage_type!r} needs an input")
        for entry in config.references():
            if entry == name:
                errors.append(f"{path}: stage {name!r}, key 'input': a stage cannot read itself")
            elif entry not in stages_raw and not expand_paths(str(resolve_input_path(entry, path.parent))):
                key = "input" if entry in config.input else _key_naming(settings, entry)
                errors.append(
                    f"{path}: stage {name!r}, key {key!r}: {entry!r} is neither a stage of this workflow "
                    f"nor an existing file or glob"
                )
        stages[name] = config
    if errors:
        raise WorkflowError("\n".join(errors))
    workflow = Workflow(
        name=workflow_name, path=path, stages=stages, dask=dask, parts=parts, raw=raw
    )
    workflow.order()  # raises on cycles
    return workflow


def _key_naming(settings: dict[str, Any], entry: str) -> str:
    """The key of a stage's settings whose value is or lists `entry` (for error messages)."""
    return next((k for k, v in settings.items() if v == entry or (isinstance(v, list) and entry in v)), "input")


def _with_part_limits(config: StageConfig, writes_no_parts: bool, parts: PartLimits) -> tuple[StageConfig, str]:
    """The stage config with the workflow's part caps filled in where the stage sets none (so they
    count in its config hash), and a complaint when a stage that writes no parts sets one."""
    if writes_no_parts:
        given = [key for key in ("max_part_rows", "max_part_bytes") if getattr(config, key) is not None]
        problem = f"key {given[0]!r}: stage type {config.type!r} writes no document parts" if given else ""
        return config, problem
    limits = {key: value for key, value in parts.model_dump().items() if getattr(config, key) is None}
    return config.model_copy(update=limits), ""


def resolve_input_path(entry: str, workflow_dir: Path) -> storage.Location:
    """A path input relative to the workflow file's folder (absolute paths and URLs stay as they are)."""
    if storage.is_url(entry):
        return storage.location(entry)
    p = Path(os.path.expanduser(entry))
    return p if p.is_absolute() else workflow_dir / p


def load_workflow(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Workflow:
    """Read, override and validate a workflow file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such workflow file") from None
    except yaml.YAMLError as error:
        raise WorkflowError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise WorkflowError(f"{path}: a workflow is a mapping with 'stages'")
    for override in overrides:
        apply_override(raw, override, path)
    return parse_workflow(raw, path)
