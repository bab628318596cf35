"""What a careless or unlucky user does to gristmill, and what gristmill does about it.

Names that are paths, two runs on one folder, parts changed behind the runner's back, exports of
scrubbed data, broken YAML, broken input files, and training output torn by a kill. Every test
builds its own inputs, runs real processes on real files, and bounds its waits.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from gristmill.model.config import TrainConfig
from gristmill.model.loop import METRICS_FILE, SAMPLES_FILE, train
from gristmill.model.sample import load_checkpoint
from gristmill.pipeline import io
from gristmill.pipeline.lock import RunLock, current_holder
from gristmill.pipeline.runner import StageError, run_workflow
from gristmill.pipeline.status import run_status
from gristmill.pipeline.workflow import WorkflowError, load_workflow
from tests.model_fixtures import write_shards
from tests.test_dashboard import messages, render
from tests.test_model_train import TINY
from tests.test_runner import GRISTMILL, REPO, subprocess_env, write_workflow

QUIET = Console(quiet=True)


def gristmill(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*GRISTMILL, *args], cwd=REPO, env={**subprocess_env(), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture()
def records(tmp_path: Path) -> Path:
    """120 small JSONL records, one of them with an e-mail address and a phone number."""
    path = tmp_path / "data" / "records.jsonl"
    path.parent.mkdir()
    rows = [{"text": f"Record number {i} says something about mills and grist, quite plainly.", "url": f"https://x.example/{i}"}
            for i in range(120)]
    rows[7]["text"] = "Write to jane.roe@millhouse.io or call +49 89 12345678 for the keys."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_workflow(tmp_path: Path, source: Path, name: str = "hostile") -> Path:
    return write_workflow(tmp_path / f"{name}.yaml", {
        "pages": {"type": "read", "input": str(source)},
        "copy": {"type": "slow_copy", "input": "pages"},
    }, dask={"scheduler": "synchronous"})


# ---------------------------------------------------------------------------------------------
# 1. names that are paths


@pytest.mark.parametrize("stage", ["../otherrun", "../../x", "/tmp/gristmill-abs", "a/b", "..", "workflow.yaml"])
def test_stage_names_that_are_paths_are_rejected(tmp_path, records, stage):
    workflow = write_workflow(tmp_path / "w.yaml", {stage: {"type": "read", "input": str(records)}})
    with pytest.raises(WorkflowError, match=rf"stage {stage!r}: a stage name is a plain name"):
        load_workflow(workflow)


@pytest.mark.parametrize("name", ["../x", "/abs/x", ".hidden", "a/../../b"])
def test_workflow_names_that_are_paths_are_rejected(tmp_path, records, name):
    workflow = write_workflow(tmp_path / "w.yaml", {"pages": {"type": "read", "input": str(records)}}, name=name)
    with pytest.raises(WorkflowError, match=r"key 'name'.*is not a plain name"):
        load_workflow(workflow)


def test_cli_refuses_a_path_named_stage_and_leaves_the_neighbouring_run_alone(tmp_path, records):
    precious = tmp_path / "runs" / "otherrun" / "kept" / "part-00000.parquet"
    precious.parent.mkdir(parents=True)
    precious.write_bytes(b"someone else's data")
    workflow = write_workflow(tmp_path / "evil.yaml", {"../otherrun": {"type": "read", "input": str(records)}},
                              dask={"scheduler": "synchronous"})
    result = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2, result.stderr
    assert "stage '../otherrun': a stage name is a plain name" in flat(result.stderr)
    assert precious.read_bytes() == b"someone else's data"
    result = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"), "--set", "name=../otherrun")
    assert result.returncode == 2 and precious.read_bytes() == b"someone else's data"


def test_the_runner_never_deletes_outside_the_run_folder(tmp_path):
    run_dir, outside = tmp_path / "runs" / "w", tmp_path / "runs" / "other"
    (run_dir / "stage").mkdir(parents=True)
    outside.mkdir()
    for escape in (run_dir / ".." / "other", run_dir, outside):
        with pytest.raises(ValueError, match="outside the run folder"):
            io.remove_tree_inside(escape, run_dir)
    assert outside.is_dir() and run_dir.is_dir()
    io.remove_tree_inside(run_dir / "stage", run_dir)
    assert not (run_dir / "stage").exists()


# ---------------------------------------------------------------------------------------------
# 2. two runs on one folder


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {seconds}s waiting for {what}")
        time.sleep(0.05)


def test_a_second_run_on_a_locked_folder_exits_naming_the_holder(tmp_path, records):
    workflow = write_workflow(tmp_path / "locked.yaml", {
        "pages": {"type": "read", "input": str(records)},
        "copy": {"type": "slow_copy", "input": "pages", "seconds_per_part": 120},
    }, dask={"scheduler": "synchronous"})
    runs = tmp_path / "runs"
    first = subprocess.Popen([*GRISTMILL, "run", str(workflow), "--runs-dir", str(runs)], cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (runs / "locked" / "copy" / io.STARTED_FILE).exists(), 60, "the first run to reach 'copy'")
        second = gristmill("run", str(workflow), "--runs-dir", str(runs))
        assert second.returncode == 3, second.stderr
        message = flat(second.stderr)
        assert f"pid {first.pid} (running)" in message and "host " in message and "since 20" in message
        assert "--force-unlock" in message
        forced = gristmill("run", str(workflow), "--runs-dir", str(runs), "--force-unlock")
        assert forced.returncode == 3 and "will not force the lock of a live run" in flat(forced.stderr)
        assert first.poll() is None, "the first run must still be working"
        assert not (runs / "locked" / "copy" / io.FAILED_FILE).exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the killed holder's lock: the next run goes ahead without --force-unlock.
    rerun = gristmill("run", str(workflow), "--runs-dir", str(runs), "--set", "copy.seconds_per_part=0")
    assert rerun.returncode == 0, rerun.stderr
    assert [s.state for s in run_status(runs / "locked")] == ["done", "done"]


def test_force_unlock_takes_the_lock_from_a_dead_holder(tmp_path, records):
    """The holder died, but a stray child that inherited its open lock file keeps the lock held."""
    workflow = copy_workflow(tmp_path, records, name="orphaned")
    run_dir = tmp_path / "runs" / "orphaned"
    holder = textwrap.dedent(f"""
        import os, sys, time
        from gristmill.pipeline.lock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        child = os.fork()
        if child == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
    """)
    spawned = subprocess.run([sys.executable, "-c", holder], env=subprocess_env(), capture_output=True, text=True,
                             timeout=60, check=True)
    stray = int(spawned.stdout.strip())
    try:
        assert current_holder(run_dir) is not None
        refused = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"))
        assert refused.returncode == 3 and "(no longer running)" in flat(refused.stderr)
        forced = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"), "--force-unlock")
        assert forced.returncode == 0, forced.stderr
        assert [s.state for s in run_status(run_dir)] == ["done", "done"]
        assert current_holder(run_dir) is None
    finally:
        os.kill(stray, signal.SIGKILL)


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path, records):
    workflow = copy_workflow(tmp_path, records)
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    assert current_holder(run_dir) is None
    lock = RunLock(run_dir)
    lock.acquire()
    lock.release()
    with pytest.raises(StageError):
        run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET, overrides=["copy.seconds_per_part=-1"])
    assert current_holder(run_dir) is None


# ---------------------------------------------------------------------------------------------
# 3. parts changed after a stage finished


def test_a_truncated_part_makes_the_stage_stale_and_run_redoes_it(tmp_path, records):
    workflow = copy_workflow(tmp_path, records)
    runs = tmp_path / "runs"
    run_dir = run_workflow(workflow, runs_dir=runs, console=QUIET)
    part = run_dir / "pages" / "kept" / "part-00000.parquet"
    original = part.read_bytes()
    part.write_bytes(original[: len(original) // 2])

    pages, copy = run_status(run_dir)
    assert (pages.state, copy.state) == ("stale", "done")
    assert str(part) in pages.error and "bytes on disk" in pages.error and "not readable Parquet" in pages.error
    shown = gristmill("status", str(workflow), "--runs-dir", str(runs))
    assert shown.returncode == 0 and f"pages stale: output changed since it finished: {part}" in flat(shown.stderr)
    with pytest.raises(StageError, match=rf"needs stage 'pages', whose output changed.*\n.*{part}"):
        run_workflow(workflow, runs_dir=runs, console=QUIET, only="copy")

    run_workflow(workflow, runs_dir=runs, console=QUIET)
    assert part.read_bytes() == original
    assert [s.state for s in run_status(run_dir)] == ["done", "done"]
    assert pq.read_table(run_dir / "copy" / "kept" / "part-00000.parquet").num_rows == 120


def test_dashboard_overview_says_a_changed_stage_is_stale(tmp_path, records, monkeypatch):
    run_dir = run_workflow(copy_workflow(tmp_path, records), runs_dir=tmp_path / "runs", console=QUIET)
    part = run_dir / "pages" / "removed" / "part-00000.parquet"
    part.unlink()
    at = render(run_dir, "overview", monkeypatch)
    assert "Stage `pages`'s output changed since it finished" in messages(at)
    assert f"{part}: missing" in messages(at)
    assert at.dataframe[0].value.set_index("stage").loc["pages", "state"] == "stale"


def test_a_part_with_rows_removed_is_not_read_silently(tmp_path, records):
    workflow = copy_workflow(tmp_path, records)
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    part = run_dir / "pages" / "kept" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).slice(50), part, compression="zstd")

    pages = run_status(run_dir)[0]
    assert pages.state == "stale" and str(part) in pages.error and "70 rows now" in pages.error
    run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    assert pq.read_table(run_dir / "copy" / "kept" / "part-00000.parquet").num_rows == 120
    extra = run_dir / "copy" / "removed" / "part-00042.parquet"
    pq.write_table(pq.read_table(part).slice(0, 1), extra)
    copy = run_status(run_dir)[1]
    assert copy.state == "stale" and f"{extra}: not written by this stage" in copy.error


def test_resume_redoes_a_finished_part_that_was_damaged_before_the_stage_ended(tmp_path, records):
    """A run killed after writing its parts but before `_DONE.json`; one part was then damaged."""
    workflow = copy_workflow(tmp_path, records)
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    part = run_dir / "copy" / "kept" / "part-00000.parquet"
    original = part.read_bytes()
    (run_dir / "copy" / io.DONE_FILE).unlink()
    part.write_bytes(original[:100])
    run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    assert json.loads((run_dir / "copy" / "stats.json").read_text())["resumed"] is True
    assert part.read_bytes() == original


def test_a_torn_parquet_input_fails_naming_the_file(tmp_path, records):
    torn = tmp_path / "data" / "torn.parquet"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "whole.parquet")
    torn.write_bytes((tmp_path / "whole.parquet").read_bytes()[:-20])
    workflow = write_workflow(tmp_path / "torn.yaml", {"copy": {"type": "slow_copy", "input": str(torn)}},
                              dask={"scheduler": "synchronous"})
    with pytest.raises(StageError, match=rf"stage 'copy': cannot read part {torn}: "):
        run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)


def test_temporaries_of_a_killed_run_are_removed_by_the_next_one(tmp_path, records):
    workflow = copy_workflow(tmp_path, records)
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    leftovers = [run_dir / "copy" / "kept" / ".part-00001.parquet.tmp-99999", run_dir / ".workflow.yaml.tmp-99999"]
    for path in leftovers:
        path.write_bytes(b"PAR1 half a part")
    run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)
    assert not any(path.exists() for path in leftovers)


# ---------------------------------------------------------------------------------------------
# 4. exports of scrubbed data


def test_exports_carry_no_pii_originals_unless_asked(tmp_path, records):
    stages = {
        "pages": {"type": "read", "input": str(records)},
        "pii": {"type": "pii", "input": "pages"},
        "after": {"type": "slow_copy", "input": "pii"},
        "export": {"type": "write", "input": "pii"},
        "raw_export": {"type": "write", "input": "pii", "pii_originals": True},
    }
    workflow = write_workflow(tmp_path / "scrub.yaml", stages, dask={"scheduler": "synchronous"})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)

    def originals(table) -> list:
        return [span["original"] for spans in table.column("pii_spans").to_pylist() for span in spans or []]

    assert "jane.roe@millhouse.io" in originals(pq.read_table(run_dir / "pii" / "kept"))
    after = originals(pq.read_table(run_dir / "after" / "kept"))
    assert after and all(value is None for value in after)
    exported = (run_dir / "export" / "export" / "part-00000.jsonl").read_text()
    assert "jane.roe@millhouse.io" not in exported and "12345678" not in exported and '"original": null' in exported
    assert "jane.roe@millhouse.io" in (run_dir / "raw_export" / "export" / "part-00000.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# 9. broken YAML on the command line


def test_unclosed_bracket_in_a_workflow_is_a_plain_error(tmp_path):
    workflow = tmp_path / "broken.yaml"
    workflow.write_text("name: broken\nstages:\n  pages: {type: read, input: [a.jsonl\n")
    result = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert f"workflow error: {workflow}: not valid YAML" in flat(result.stderr)
    assert "Traceback" not in result.stderr and "MarkupError" not in result.stderr


def test_set_with_invalid_yaml_is_a_clear_error(tmp_path, records):
    workflow = copy_workflow(tmp_path, records)
    result = gristmill("run", str(workflow), "--runs-dir", str(tmp_path / "runs"), "--set", "copy.drop_shorter_than=[1")
    assert result.returncode == 2
    assert "--set 'copy.drop_shorter_than=[1': the value '[1' is not valid YAML" in flat(result.stderr)
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# 10. broken input files


def test_a_broken_gzip_file_becomes_removed_rows_and_its_neighbours_are_read(tmp_path):
    folder = tmp_path / "dumps"
    folder.mkdir()
    lines = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode()
    (folder / "good.jsonl.gz").write_bytes(gzip.compress(lines[:5000]))
    whole = gzip.compress(lines)
    (folder / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "plain.jsonl.gz").write_bytes(lines[:3000])
    workflow = write_workflow(tmp_path / "gz.yaml", {"pages": {"type": "read", "input": str(folder / "*.jsonl.gz")}},
                              dask={"scheduler": "synchronous"})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=QUIET)

    removed = pq.read_table(run_dir / "pages" / "removed").to_pylist()
    reasons = {Path(row["source"]).name: row["reason"] for row in removed if row["reason"].startswith("read:unreadable")}
    assert set(reasons) == {"truncated.jsonl.gz", "plain.jsonl.gz"}
    assert str(folder / "plain.jsonl.gz") in reasons["plain.jsonl.gz"] and "BadGzipFile" in reasons["plain.jsonl.gz"]
    assert "EOFError" in reasons["truncated.jsonl.gz"]
    kept = pq.read_table(run_dir / "pages" / "kept").to_pylist()
    good = [row for row in kept if row["source"].endswith("good.jsonl.gz")]
    assert len(good) == lines[:5000].count(b"\n")
    done = json.loads((run_dir / "pages" / io.DONE_FILE).read_text())["counts"]
    assert done["in"] == done["kept"] + done["removed"] == len(kept) + len(removed)


# ---------------------------------------------------------------------------------------------
# 11. training output torn by a kill


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    texts = [f"The mill grinds grist number {i}, and the miller keeps the flour. " * 8 for i in range(40)]
    return write_shards(tmp_path_factory.mktemp("shards"), texts, vocab_size=300)


def tiny_config(**settings) -> TrainConfig:
    return TrainConfig(**{**TINY, "n_layer": 1, "n_embd": 32, "seq_len": 32, "batch_size": 4, "warmup_steps": 2,
                          "max_steps": 8, "sample_tokens": 4, "eval_every": 1000, **settings})


def test_resume_drops_a_torn_metrics_line_and_a_half_written_checkpoint(tmp_path, small_shards):
    out = tmp_path / "model"
    train(tiny_config(stop_at=4, checkpoint_every=2), small_shards, out)
    with (out / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "loss": 5.1')
    partial = out / ".checkpoint.pt.tmp-424242"
    partial.write_bytes(os.urandom(2 * 2**20))
    train(tiny_config(checkpoint_every=2), small_shards, out, resume=True)
    steps = [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert not partial.exists()


def test_a_damaged_metrics_line_before_the_tail_names_the_file(tmp_path, small_shards):
    out = tmp_path / "model"
    train(tiny_config(stop_at=4, checkpoint_every=4), small_shards, out)
    lines = (out / METRICS_FILE).read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{out / METRICS_FILE}, line 2: not a record"):
        train(tiny_config(checkpoint_every=4), small_shards, out, resume=True)


def test_a_kill_at_a_checkpoint_loses_no_sample(tmp_path, small_shards):
    """Kill the trainer the moment a new checkpoint lands, resume, and find one sample per step."""
    out = tmp_path / "model"
    command = [*GRISTMILL, "train", str(small_shards), "--out", str(out), "--max-steps", "400", "--n-layer", "1",
               "--n-embd", "32", "--seq-len", "32", "--batch-size", "4", "--device", "cpu",
               "--set", "checkpoint_every=1", "--set", "sample_tokens=24", "--set", "progress=false",
               "--set", "eval_every=1000", "--set", "warmup_steps=2"]
    trainer = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.pt"
    try:
        wait_for(checkpoint.exists, 120, "the first checkpoint")
        seen = {checkpoint.stat().st_mtime_ns}
        deadline = time.monotonic() + 120
        while len(seen) < 3 and time.monotonic() < deadline and trainer.poll() is None:
            stamp = checkpoint.stat().st_mtime_ns
            if stamp not in seen:
                seen.add(stamp)
                if len(seen) == 3:
                    trainer.send_signal(signal.SIGKILL)
            time.sleep(0.001)
    finally:
        trainer.kill()
        trainer.wait()
    assert len(seen) == 3, "the trainer finished or stalled before three checkpoints"
    killed_at = load_checkpoint(checkpoint)["step"]
    resumed = subprocess.run([*command, "--resume", "--set", f"stop_at={killed_at + 2}"], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    samples = [json.loads(line)["step"] for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert samples == list(range(1, killed_at + 3))
