"""Run folders and inputs on object storage: a real S3 API (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from rich.console import Console

from gristmill.pipeline import io, storage
from gristmill.pipeline.lock import LEASE_FILE, RunLocked, current_holder, run_lock
from gristmill.pipeline.runner import StageError, run_workflow
from gristmill.pipeline.status import run_status
from tests.quickstart import QUICKSTART

REPO = Path(__file__).resolve().parents[1]
GRISTMILL = [sys.executable, "-m", "gristmill.cli"]
QUIET = Console(quiet=True)
ACCESS_KEY, SECRET_KEY = "AKIAGRISTMILLTEST", "gristmill-test-secret-4f2a9c"  # moto accepts any


@dataclass
class S3:
    fs: object  # s3fs.S3FileSystem talking to the local server
    env: dict[str, str]  # what a subprocess needs to reach it

    def bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 server on loopback; the environment points every S3 client (s3fs here, in Dask
    workers and in subprocesses) at it with dummy credentials, exactly as a real deployment would."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield S3(s3fs.S3FileSystem(use_listings_cache=False), env)
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def subprocess_env(s3: S3) -> dict[str, str]:
    return {**os.environ, **s3.env, "PYTHONPATH": str(REPO)}


def part_bytes(stage_dir) -> dict[str, bytes]:
    return {f"{sub}/{p.name}": p.read_bytes() for sub in (io.KEPT, io.REMOVED)
            for p in io.list_parts(storage.location(stage_dir) / sub)}


@pytest.fixture(scope="module")
def crawled_warcs(tmp_path_factory) -> list[Path]:
    """WARC files of the quickstart's crawl of the bundled sample site (crawls write to local disk)."""
    runs = tmp_path_factory.mktemp("crawl-runs")
    run_dir = run_workflow(QUICKSTART, runs_dir=runs, until="crawl", scheduler="synchronous", console=QUIET)
    warcs = sorted((run_dir / "crawl" / "warc").glob("*.warc.gz"))
    assert len(warcs) >= 2
    return warcs


def short_quickstart(path: Path, warcs: str) -> Path:
    """The quickstart from extract to pii, reading the crawl's WARC files from `warcs`."""
    stages = {"extract": {"type": "extract", "input": warcs}, "filter": {"type": "filter", "input": "extract"},
              "dedup": {"type": "dedup", "input": "filter"}, "pii": {"type": "pii", "input": "dedup"}}
    path.write_text(yaml.safe_dump({"name": "quickstart", "stages": stages}, sort_keys=False))
    return path


@dataclass
class TwoRuns:
    workflow: Path
    local: Path
    remote: storage.Location


@pytest.fixture(scope="module")
def quickstart_on_s3(s3, crawled_warcs, tmp_path_factory) -> TwoRuns:
    """The short quickstart run twice on the same WARC files in S3: run folder on local disk, then on S3."""
    bucket, tmp_path = s3.bucket(), tmp_path_factory.mktemp("s3-quickstart")
    s3.fs.put([str(p) for p in crawled_warcs], f"{bucket}/crawl/")
    workflow = short_quickstart(tmp_path / "quickstart.yaml", f"s3://{bucket}/crawl/*.warc.gz")
    local = run_workflow(workflow, runs_dir=tmp_path / "runs", scheduler="synchronous", console=QUIET)
    remote = run_workflow(workflow, runs_dir=f"s3://{bucket}/runs", scheduler="synchronous", console=QUIET)
    return TwoRuns(workflow, local, remote)


def test_quickstart_with_its_run_folder_on_s3_gives_parts_byte_identical_to_a_local_run(s3, quickstart_on_s3):
    local, remote = quickstart_on_s3.local, quickstart_on_s3.remote
    assert str(remote).startswith("s3://") and str(remote).endswith("/runs/quickstart")
    for stage in ("extract", "filter", "dedup", "pii"):
        local_parts, remote_parts = part_bytes(local / stage), part_bytes(remote / stage)
        assert local_parts and local_parts == remote_parts, stage
        assert io.read_json(remote / stage / io.DONE_FILE)["counts"] == io.read_json(local / stage / io.DONE_FILE)["counts"]
    assert io.read_json(remote / "extract" / io.DONE_FILE)["counts"]["in"] > 200
    assert not s3.fs.exists(f"{remote.path}/dedup/work")  # the shuffle's scratch files are gone

    for key in s3.fs.find(remote.path):  # workflow.yaml, manifests, stats, parts: no credential anywhere
        data = s3.fs.cat_file(key)
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, key

    again = run_workflow(quickstart_on_s3.workflow, runs_dir=remote.parent, scheduler="synchronous", console=QUIET)
    assert io.read_json(again / "pii" / io.DONE_FILE) == io.read_json(remote / "pii" / io.DONE_FILE)  # skipped


def test_gristmill_status_reads_a_run_folder_on_s3(s3, quickstart_on_s3):
    remote = quickstart_on_s3.remote
    statuses = run_status(str(remote))
    assert [(s.name, s.state) for s in statuses] == [(n, "done") for n in ("extract", "filter", "dedup", "pii")]
    shown = subprocess.run([*GRISTMILL, "status", str(remote)], cwd=REPO,
                           env={**subprocess_env(s3), "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("done") == 4
    pii = io.read_json(remote / "pii" / io.DONE_FILE)["counts"]
    assert f"{pii['kept']:,}" in shown.stdout


def test_the_dashboard_reads_a_run_folder_on_s3(s3, quickstart_on_s3, monkeypatch):
    from streamlit.testing.v1 import AppTest

    remote = quickstart_on_s3.remote
    monkeypatch.setenv("GRISTMILL_RUN", str(remote))
    for page in ("overview", "dedup", "pii"):
        at = AppTest.from_file(str(REPO / "gristmill" / "dashboards" / "app.py"), default_timeout=120)
        at.query_params["page"] = page
        at.run()
        assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
        if page == "overview":
            shown = {m.label: m.value for m in at.metric}
            assert shown["stages done"] == "4 / 4"
            assert shown["documents in"] == f"{io.read_json(remote / 'extract' / io.DONE_FILE)['counts']['in']:,}"
            assert shown["documents out"] == f"{io.read_json(remote / 'pii' / io.DONE_FILE)['counts']['kept']:,}"


def test_an_exception_mid_upload_aborts_it_and_publishes_no_part(s3):
    bucket = s3.bucket()
    big = os.urandom(7 * 2**20)  # past s3fs's 5 MiB block: the upload is multipart and under way

    # What the guard is for: fsspec's own `with` completes the upload while the exception unwinds.
    with pytest.raises(RuntimeError), s3.fs.open(f"{bucket}/plain/part-00000.parquet", "wb") as handle:
        handle.write(big)
        handle.flush()
        raise RuntimeError("worker died mid-upload")
    assert s3.fs.size(f"{bucket}/plain/part-00000.parquet") >= 5 * 2**20  # a truncated object, visible

    target = storage.location(f"s3://{bucket}/stage/kept/part-00000.parquet")
    io.write_parquet_atomic(pa.table({"text": ["an earlier, finished version"]}), target)
    assert io.list_parts(target.parent) == [target]
    with pytest.raises(RuntimeError), storage.publishing(target) as handle:
        handle.write(big)
        handle.flush()
        raise RuntimeError("worker died mid-upload")

    assert io.list_parts(target.parent) == []  # neither the old version nor a torn new one is trusted
    assert not storage.is_published(target)
    uploads = s3.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert uploads == []  # aborted, not left to accumulate storage charges
    assert io.remove_temporaries(f"s3://{bucket}/stage") == 1  # the stale old object goes too
    assert s3.fs.find(f"{bucket}/stage") == []


def test_objects_without_a_marker_are_ignored_by_readers_and_removed_by_the_next_run(s3, tmp_path):
    bucket = s3.bucket()
    corpus = "\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(6)) + "\n"
    s3.fs.pipe_file(f"{bucket}/in/docs.jsonl", corpus.encode())
    workflow = tmp_path / "bare.yaml"
    workflow.write_text(yaml.safe_dump({"name": "bare", "stages": {"read": {"type": "read", "input": f"s3://{bucket}/in/*.jsonl"}}}))
    run_dir = run_workflow(workflow, runs_dir=f"s3://{bucket}/runs", scheduler="synchronous", console=QUIET)
    stray = f"{bucket}/runs/bare/read/kept/part-00001.parquet"
    s3.fs.pipe_file(stray, b"PAR1 half an upload from a killed attempt")

    assert [p.name for p in io.kept_parts(run_dir / "read")] == ["part-00000.parquet"]
    assert [s.state for s in run_status(run_dir)] == ["done"]  # not "stale": the stray was never published
    run_workflow(workflow, runs_dir=f"s3://{bucket}/runs", scheduler="synchronous", console=QUIET)
    assert not s3.fs.exists(stray)


def test_a_run_killed_mid_stage_on_s3_resumes_to_the_same_parts(s3, tmp_path):
    bucket = s3.bucket()
    for f in range(4):
        lines = [json.dumps({"text": f"file {f} document {i} " + "word " * (10 * i)}) for i in range(5)]
        s3.fs.pipe_file(f"{bucket}/in/part-{f}.jsonl", ("\n".join(lines) + "\n").encode())
    stages = {"pages": {"type": "read", "input": f"s3://{bucket}/in/*.jsonl", "files_per_part": 1},
              "copy": {"type": "slow_copy", "input": "pages", "seconds_per_part": 0.8, "drop_shorter_than": 60}}
    workflow = tmp_path / "resume.yaml"
    workflow.write_text(yaml.safe_dump({"name": "resume", "imports": ["tests.runner_stages"],
                                        "dask": {"scheduler": "synchronous"}, "stages": stages}))
    command = [*GRISTMILL, "run", str(workflow), "--runs-dir", f"s3://{bucket}/killed"]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(s3), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    states = f"{bucket}/killed/resume/copy/{io.PARTS_STATE_DIR}"
    deadline = time.monotonic() + 90
    while len(s3.fs.glob(f"{states}/*.json{storage.MARKER_SUFFIX}")) < 2:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the middle of the copy stage"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = storage.location(f"s3://{bucket}/killed/resume")
    assert io.read_json(killed / "copy" / io.DONE_FILE) is None
    assert current_holder(killed) is not None  # the dead run's lease has not expired yet

    refused = subprocess.run(command, cwd=REPO, env=subprocess_env(s3), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3 and "--force-unlock" in refused.stderr
    resumed = subprocess.run([*command, "--force-unlock"], cwd=REPO, env=subprocess_env(s3), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    clean = run_workflow(workflow, runs_dir=tmp_path / "clean", console=QUIET)

    assert io.read_json(killed / "copy" / io.STATS_FILE)["resumed"] is True
    for stage in ("pages", "copy"):
        assert part_bytes(killed / stage) == part_bytes(clean / stage), stage
    assert io.read_json(killed / "copy" / io.DONE_FILE)["counts"] == io.read_json(clean / "copy" / io.DONE_FILE)["counts"]
    assert current_holder(killed) is None  # released at the end of the run


def test_a_live_lease_refuses_a_second_run_and_an_expired_one_does_not(s3):
    run_dir = storage.location(f"s3://{s3.bucket()}/runs/leased")
    foreign = {"host": "another-machine", "pid": 1, "process_started": 0.0, "locked_at": "2026-01-01T00:00:00+00:00"}
    io.write_json_atomic({"holder": foreign, "expires": time.time() + 60}, run_dir / LEASE_FILE)
    with pytest.raises(RunLocked, match="another-machine"):
        with run_lock(run_dir):
            pass
    io.write_json_atomic({"holder": foreign, "expires": time.time() - 1}, run_dir / LEASE_FILE)
    with run_lock(run_dir):
        assert current_holder(run_dir).pid == os.getpid()
    assert current_holder(run_dir) is None


def test_a_run_folder_on_a_read_only_back_end_is_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    workflow = tmp_path / "w.yaml"
    workflow.write_text(yaml.safe_dump({"name": "w", "stages": {"read": {"type": "read", "input": "x.jsonl"}}}))
    with pytest.raises(ValueError, match="read-only"):
        run_workflow(workflow, runs_dir="https://example.invalid/runs", console=QUIET)


def test_memory_urls_hold_inputs_and_run_folders_for_in_process_runs(tmp_path):
    root = f"memory://gristmill-{uuid.uuid4().hex[:8]}"
    storage.location(f"{root}/in/a.txt").write_bytes(b"plain text from memory")
    workflow = tmp_path / "mem.yaml"
    workflow.write_text(yaml.safe_dump({"name": "mem", "dask": {"scheduler": "synchronous"},
                                        "stages": {"read": {"type": "read", "input": f"{root}/in/*.txt"}}}))
    run_dir = run_workflow(workflow, runs_dir=f"{root}/runs", console=QUIET)
    [part] = io.kept_parts(run_dir / "read")
    table = storage.read_parquet(part)
    assert table.column("text").to_pylist() == ["plain text from memory"]
    assert table.column("source").to_pylist() == [f"{root}/in/a.txt"]


def test_a_cluster_started_from_a_scheduler_file_runs_a_workflow_whose_run_folder_is_on_s3(s3, tmp_path):
    """The multi-node recipe on one machine: scheduler and two workers as separate processes, joined
    through a scheduler file; the only storage they share is the S3 bucket."""
    from distributed import Client

    bucket = s3.bucket()
    for f in range(3):
        lines = [json.dumps({"text": f"file {f} document {i} " + "word " * (10 * i)}) for i in range(4)]
        s3.fs.pipe_file(f"{bucket}/in/part-{f}.jsonl", ("\n".join(lines) + "\n").encode())
    scheduler_file = tmp_path / "scheduler.json"
    dask_bin = Path(sys.executable).parent / "dask"
    env = subprocess_env(s3)
    quiet = {"cwd": tmp_path, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([str(dask_bin), "scheduler", "--scheduler-file", str(scheduler_file),
                                   "--host", "127.0.0.1", "--port", "0", "--no-dashboard"], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler never wrote its file"
            time.sleep(0.1)
        processes += [subprocess.Popen([str(dask_bin), "worker", "--scheduler-file", str(scheduler_file),
                                        "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"], **quiet)
                      for _ in range(2)]
        with Client(scheduler_file=str(scheduler_file)) as client:
            client.wait_for_workers(2, timeout=60)
        stages = {"pages": {"type": "read", "input": f"s3://{bucket}/in/*.jsonl", "files_per_part": 1},
                  "copy": {"type": "slow_copy", "input": "pages", "drop_shorter_than": 60}}
        workflow = tmp_path / "nodes.yaml"
        workflow.write_text(yaml.safe_dump({"name": "nodes", "imports": ["tests.runner_stages"],
                                            "dask": {"scheduler_file": str(scheduler_file)}, "stages": stages}))
        console = Console(record=True, width=200)
        run_dir = run_workflow(workflow, runs_dir=f"s3://{bucket}/runs", console=console)
        assert "dask: connected to tcp://127.0.0.1:" in console.export_text()
        done = io.read_json(run_dir / "copy" / io.DONE_FILE)
        assert done["counts"] == {"in": 12, "kept": 9, "removed": 3, "parts": 3}
        assert [s.state for s in run_status(run_dir)] == ["done", "done"]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_a_stage_that_writes_only_local_files_refuses_a_run_folder_on_object_storage(tmp_path):
    root = f"memory://gristmill-{uuid.uuid4().hex[:8]}"
    storage.location(f"{root}/in/a.txt").write_bytes(b"some text")
    workflow = tmp_path / "export.yaml"
    workflow.write_text(yaml.safe_dump({"name": "export", "dask": {"scheduler": "synchronous"}, "stages": {
        "read": {"type": "read", "input": f"{root}/in/*.txt"}, "write": {"type": "write", "input": "read"}}}))
    with pytest.raises(StageError, match=r"stage 'write' \(write\) writes its folder on local disk only"):
        run_workflow(workflow, runs_dir=f"{root}/runs", console=QUIET)
    assert io.read_json(storage.location(f"{root}/runs/export/read") / io.DONE_FILE)["counts"]["kept"] == 1
