"""`gristmill ...`: run workflows, inspect run folders, and the stand-alone tools of each room."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gristmill.model import cli as model_cli
from gristmill.model.finetune.cli import finetune_command
from gristmill.model.train import train_command
from gristmill.pipeline import io, storage
from gristmill.pipeline.crawl import cli as crawl_cli
from gristmill.pipeline.lock import RunLocked, current_holder
from gristmill.pipeline.status import run_status
from gristmill.pipeline.workflow import WorkflowError, load_workflow
from gristmill.tokenize import cli as tokenizer_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="gristmill: web pages in, pretraining tokens and a trained model out; every stage inspectable.",
)
console = Console(stderr=True)


def fail(label: str, error: object, code: int) -> typer.Exit:
    """Print `label: error` as plain text (messages quote YAML and paths, which may hold `[`
    that rich would read as markup) and return the exit to raise."""
    console.print(Text(f"{label}: ", style="red"), Text(str(error)), sep="")
    return typer.Exit(code)


@app.command()
def run(
    workflow: Path = typer.Argument(..., help="Workflow YAML file, e.g. workflows/quickstart.yaml"),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a setting: STAGE.KEY=VALUE (repeatable)"),
    scheduler: str | None = typer.Option(
        None, help="tcp://host:port of a running Dask scheduler, or 'synchronous' (default: a LocalCluster)"
    ),
    runs_dir: str = typer.Option("runs", help="Folder that holds run folders: a path or a URL (s3://bucket/runs)"),
    force: bool = typer.Option(False, help="Run every stage again, even those already done"),
    only: str | None = typer.Option(None, help="Run only this stage (its inputs must be done)"),
    from_: str | None = typer.Option(None, "--from", help="Run this stage and everything downstream again"),
    until: str | None = typer.Option(None, help="Stop after this stage: run only it and what it depends on"),
    force_unlock: bool = typer.Option(
        False, help="Take the run folder's lock from a holder that is dead but still holds it (never a live run)"
    ),
) -> None:
    """Run a workflow; stages already done with the same config and input are skipped."""
    from gristmill.pipeline.runner import StageError, run_workflow

    try:
        run_dir = run_workflow(
            workflow, runs_dir=runs_dir, overrides=set_, force=force, only=only, from_stage=from_, until=until,
            scheduler=scheduler, console=console, force_unlock=force_unlock,
        )
    except RunLocked as error:
        raise fail("run folder locked", error, 3) from None
    except WorkflowError as error:
        raise fail("workflow error", error, 2) from None
    except StageError as error:
        raise fail("stage failed", error, 1) from None
    console.print(Text(f"run folder: {run_dir}"))


@app.command()
def status(
    target: str = typer.Argument(..., help="A run folder (runs/NAME, s3://bucket/runs/NAME) or the workflow file that made it"),
    runs_dir: str = typer.Option("runs", help="Where run folders live, when TARGET is a workflow"),
) -> None:
    """Print the DAG of a run with each stage's state, counts and wall time."""
    workflow = None
    run_dir = storage.location(target)
    if not storage.is_remote(run_dir) and run_dir.is_file():
        try:
            workflow = load_workflow(run_dir)
        except WorkflowError as error:
            raise fail("workflow error", error, 2) from None
        run_dir = storage.location(runs_dir) / workflow.name
    try:
        statuses = run_status(run_dir)
    except FileNotFoundError as error:
        raise fail("error", error, 2) from None
    if workflow is not None:
        from gristmill.pipeline.runner import config_hash

        stale: set[str] = set()
        by_name = {st.name: st for st in statuses}
        for name in workflow.order():  # a stage downstream of a stale one is stale too
            st = by_name.get(name)
            if st is not None and st.state == "stale":
                stale.add(st.name)
            if st is None or st.state != "done":
                continue
            done = io.read_json(run_dir / st.name / io.DONE_FILE)
            changed = done["config_hash"] != config_hash(workflow, st.name)
            if changed or any(dep in stale for dep in workflow.upstream(st.name)[:-1]):
                st.state = "stale"
                stale.add(st.name)
    colours = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "magenta", "stale": "yellow"}
    table = Table(title=escape(f"run {run_dir}"))
    for column in ("stage", "type", "input", "state", "in", "kept", "removed", "other counts", "wall s"):
        table.add_column(column, justify="right" if column in ("in", "kept", "removed", "wall s") else "left")
    for st in statuses:
        counts = dict(st.counts)
        main = [f"{counts.pop(k):,}" if k in counts else "" for k in ("in", "kept", "removed")]
        other = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items())
        state = f"[{colours.get(st.state, 'white')}]{st.state}[/]"
        wall = f"{st.wall_time_s:.1f}" if st.wall_time_s is not None and st.state == "done" else ""
        table.add_row(escape(st.name), escape(st.type), escape(", ".join(st.inputs)), state, *main, other, wall)
    # Piped output (CI logs, files) gets a wide table instead of the 80-column default.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    holder = current_holder(run_dir)
    if holder is not None:
        console.print(Text(f"a run is writing this folder: {holder.describe()}"))
    for st in statuses:
        if st.state in ("failed", "stale") and st.error:
            console.print(Text(f"{st.name} {st.state}: ", style="red"), Text(st.error), sep="")


@app.command()
def dashboard(
    run_dir: str | None = typer.Argument(
        None, help="Run folder, a path or URL (default: $GRISTMILL_RUN, else the runs/ folder)"
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it on this machine"),
    port: int = typer.Option(8501, help="Port to serve on"),
) -> None:
    """Open the Streamlit dashboard over a run folder (or every run under runs/)."""
    target = storage.location(run_dir or os.environ.get("GRISTMILL_RUN", "runs"))
    app_path = Path(__file__).parent / "dashboards" / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--", "--run", str(target if storage.is_remote(target) else target.resolve()),
    ]
    raise typer.Exit(subprocess.call(command))


app.command("train")(train_command)
app.command("sample")(model_cli.sample_command)
app.command("fill-mask")(model_cli.fill_mask_command)
app.command("export")(model_cli.export_command)
app.command("finetune")(finetune_command)
app.add_typer(tokenizer_cli.app, name="tokenizer")
app.command("crawl")(crawl_cli.crawl_command)


if __name__ == "__main__":  # pragma: no cover
    app()
