"""The backbone: workflows run as DAGs on Dask, with resume, conservation and clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.runner import ConservationError, run_workflow
from gristmill.pipeline.status import run_status
from gristmill.pipeline.workflow import WorkflowError, load_workflow
from tests.quickstart import QUICKSTART_TEST_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
GRISTMILL = [sys.executable, "-m", "gristmill.cli"]
SAMPLE_PAGES = sorted((DATA_DIR / "sample_site" / "python").rglob("*.html"))


def subprocess_env() -> dict[str, str]:
    """The test stages live in `tests.runner_stages`; subprocesses need the repo on their path."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """Real pages as a JSONL file (one malformed line among them) and as plain-text files."""
    folder = tmp_path / "corpus"
    (folder / "text").mkdir(parents=True)
    lines = []
    for i, page in enumerate(SAMPLE_PAGES[:12]):
        lines.append(json.dumps({"text": page.read_text(), "url": f"https://docs.example/{page.name}", "n": i}))
    lines.insert(5, '{"text": "unterminated')
    lines.append(json.dumps({"url": "https://docs.example/no-text"}))
    (folder / "pages.jsonl").write_text("\n".join(lines) + "\n")
    for page in SAMPLE_PAGES[12:20]:
        (folder / "text" / f"{page.stem}.txt").write_text(page.read_text())
    return folder


def write_workflow(path: Path, stages: dict, **top) -> Path:
    doc = {"name": path.stem, "imports": ["tests.runner_stages"], **top, "stages": stages}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fan_in_stages(corpus: Path, seconds_per_part: float = 0.0) -> dict:
    return {
        "pages": {"type": "read", "input": str(corpus / "pages.jsonl")},
        "notes": {"type": "read", "input": str(corpus / "text" / "*.txt"), "files_per_part": 3},
        "copy": {"type": "slow_copy", "input": ["pages", "notes"], "drop_shorter_than": 20_000,
                 "seconds_per_part": seconds_per_part},
        "export": {"type": "write", "input": "copy", "format": "parquet"},
    }


def part_bytes(stage_dir: Path) -> dict[str, bytes]:
    return {
        f"{sub}/{p.name}": p.read_bytes()
        for sub in (io.KEPT, io.REMOVED)
        for p in io.list_parts(stage_dir / sub)
    }


def test_fan_in_dag_runs_on_a_local_cluster_and_conserves_documents(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "fanin.yaml", fan_in_stages(corpus), dask={"n_workers": 2})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")

    pages = json.loads((run_dir / "pages" / io.DONE_FILE).read_text())["counts"]
    notes = json.loads((run_dir / "notes" / io.DONE_FILE).read_text())["counts"]
    copy = json.loads((run_dir / "copy" / io.DONE_FILE).read_text())["counts"]
    assert pages == {"in": 14, "kept": 12, "removed": 2, "parts": 1}
    assert notes == {"in": 8, "kept": 8, "removed": 0, "parts": 3}
    assert copy["in"] == 20 and copy["parts"] == 4
    assert copy["kept"] + copy["removed"] == 20

    reasons = pq.read_table(run_dir / "pages" / io.REMOVED / io.part_name(0)).column("reason").to_pylist()
    assert reasons[0].startswith("read:bad_json (line at byte ")
    assert reasons[1].startswith("read:no_text (line at byte ") and reasons[1].endswith(": key 'text' missing)")

    kept_texts = pq.read_table(run_dir / "copy" / io.KEPT).column("text").to_pylist()
    expected = [p.read_text() for p in SAMPLE_PAGES[:20] if len(p.read_text()) >= 20_000]
    assert sorted(kept_texts) == sorted(expected)
    stats = json.loads((run_dir / "copy" / io.STATS_FILE).read_text())
    assert stats["parts_seen"] == 4
    assert stats["characters"] == sum(len(p.read_text()) for p in SAMPLE_PAGES[:20])
    assert [s.state for s in run_status(run_dir)] == ["done"] * 4
    export = sorted((run_dir / "export" / "export").glob("*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in export) == copy["kept"]


def test_ids_are_stable_across_runs(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "ids.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    first = run_workflow(workflow, runs_dir=tmp_path / "a")
    second = run_workflow(workflow, runs_dir=tmp_path / "b")
    ids = [pq.read_table(r / "copy" / io.KEPT).column("id").to_pylist() for r in (first, second)]
    assert ids[0] == ids[1] and len(set(ids[0])) == len(ids[0])


def test_resume_after_sigkill_gives_identical_parts(tmp_path, corpus):
    stages = fan_in_stages(corpus, seconds_per_part=0.6)
    workflow = write_workflow(tmp_path / "resume.yaml", stages, dask={"scheduler": "synchronous"})
    command = [*GRISTMILL, "run", str(workflow), "--runs-dir", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_dir = tmp_path / "killed" / "resume" / "copy" / io.PARTS_STATE_DIR
    deadline = time.monotonic() + 60
    while not (state_dir.exists() and len(list(state_dir.glob("*.json"))) >= 2):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the middle of the copy stage"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_stage = tmp_path / "killed" / "resume" / "copy"
    assert not (killed_stage / io.DONE_FILE).exists()
    finished_before_kill = {p.name for p in state_dir.glob("*.json")}
    assert 2 <= len(finished_before_kill) < 4

    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    uninterrupted = run_workflow(workflow, runs_dir=tmp_path / "clean")

    resumed_stats = json.loads((killed_stage / io.STATS_FILE).read_text())
    assert resumed_stats["resumed"] is True
    for stage in ("pages", "notes", "copy"):
        assert part_bytes(tmp_path / "killed" / "resume" / stage) == part_bytes(uninterrupted / stage)
    done = [json.loads((d / "copy" / io.DONE_FILE).read_text()) for d in (tmp_path / "killed" / "resume", uninterrupted)]
    assert done[0]["counts"] == done[1]["counts"]


def test_done_stages_are_skipped_and_a_changed_setting_reruns_downstream(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "skip.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    finished = {s: json.loads((run_dir / s / io.DONE_FILE).read_text())["finished_at"] for s in fan_in_stages(corpus)}

    run_workflow(workflow, runs_dir=tmp_path / "runs")
    again = {s: json.loads((run_dir / s / io.DONE_FILE).read_text())["finished_at"] for s in finished}
    assert again == finished

    run_workflow(workflow, runs_dir=tmp_path / "runs", overrides=["copy.drop_shorter_than=0"])
    changed = {s: json.loads((run_dir / s / io.DONE_FILE).read_text())["finished_at"] for s in finished}
    assert changed["pages"] == finished["pages"] and changed["notes"] == finished["notes"]
    assert changed["copy"] != finished["copy"] and changed["export"] != finished["export"]
    assert json.loads((run_dir / "copy" / io.DONE_FILE).read_text())["counts"]["removed"] == 0
    assert yaml.safe_load((run_dir / "workflow.yaml").read_text())["stages"]["copy"]["drop_shorter_than"] == 0


def test_only_and_from_choose_what_runs_again(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "pick.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")

    def finished() -> dict[str, str]:
        return {s: json.loads((run_dir / s / io.DONE_FILE).read_text())["finished_at"] for s in fan_in_stages(corpus)}

    before = finished()
    run_workflow(workflow, runs_dir=tmp_path / "runs", only="export")
    after_only = finished()
    assert [s for s in before if before[s] != after_only[s]] == ["export"]

    run_workflow(workflow, runs_dir=tmp_path / "runs", from_stage="copy")
    after_from = finished()
    assert [s for s in before if after_only[s] != after_from[s]] == ["copy", "export"]

    run_workflow(workflow, runs_dir=tmp_path / "runs", force=True)
    assert all(finished()[s] != after_from[s] for s in before)


def test_only_refuses_a_stage_whose_input_has_not_run(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "early.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    with pytest.raises(Exception, match="stage 'copy' needs stage 'pages', which has not finished"):
        run_workflow(workflow, runs_dir=tmp_path / "runs", only="copy")


def test_a_stage_that_loses_documents_is_caught(tmp_path, corpus):
    stages = {"pages": {"type": "read", "input": str(corpus / "pages.jsonl")},
              "lossy": {"type": "leaky", "input": "pages"}}
    workflow = write_workflow(tmp_path / "lossy.yaml", stages, dask={"scheduler": "synchronous"})
    with pytest.raises(ConservationError, match=r"stage 'lossy', part .*pages.*: 12 rows in but 11 kept \+ 0 removed"):
        run_workflow(workflow, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs" / "lossy" / "lossy" / io.DONE_FILE).exists()
    failed = json.loads((tmp_path / "runs" / "lossy" / "lossy" / io.FAILED_FILE).read_text())
    assert "ConservationError" in failed["error"]
    assert [s.state for s in run_status(tmp_path / "runs" / "lossy")] == ["done", "failed"]


def test_a_global_stage_that_loses_parts_on_disk_is_caught(tmp_path, corpus):
    stages = {"notes": {"type": "read", "input": str(corpus / "text" / "*.txt"), "files_per_part": 3},
              "global": {"type": "leaky_global", "input": "notes"}}
    workflow = write_workflow(tmp_path / "glob.yaml", stages, dask={"scheduler": "synchronous"})
    with pytest.raises(ConservationError, match=r"stage 'global': 8 documents in but 3 kept \+ 0 removed on disk"):
        run_workflow(workflow, runs_dir=tmp_path / "runs")


@pytest.mark.parametrize(
    ("stages", "override", "message"),
    [
        ({"a": {"type": "read", "input": "{corpus}/pages.jsonl", "colour": "red"}}, None,
         "stage 'a', key 'colour': unknown key"),
        ({"a": {"type": "read", "input": "{corpus}/pages.jsonl", "files_per_part": "many"}}, None,
         "stage 'a', key 'files_per_part': Input should be a valid integer"),
        ({"a": {"type": "reed", "input": "{corpus}/pages.jsonl"}}, None,
         "stage 'a', key 'type': unknown stage type 'reed'"),
        ({"a": {"type": "read", "input": "{corpus}/nothing-here/*.jsonl"}}, None,
         "stage 'a', key 'input': '{corpus}/nothing-here/*.jsonl' is neither a stage"),
        ({"a": {"type": "slow_copy", "input": "b"}, "b": {"type": "slow_copy", "input": "a"}}, None,
         "stage 'a', key 'input': cycle a -> b -> a"),
        ({"a": {"type": "slow_copy"}}, None, "stage 'a', key 'input': stage type 'slow_copy' needs an input"),
        ({"a": {"type": "read", "input": "{corpus}/pages.jsonl"}}, "b.format=text", "has no stage 'b'"),
        ({"a": {"type": "read", "input": "{corpus}/pages.jsonl"}}, "a.format=yaml",
         "stage 'a', key 'format': Input should be 'auto', 'jsonl', 'parquet' or 'text'"),
    ],
)
def test_config_errors_name_the_file_the_stage_and_the_key(tmp_path, corpus, stages, override, message):
    stages = yaml.safe_load(yaml.safe_dump(stages).replace("{corpus}", str(corpus)))
    workflow = write_workflow(tmp_path / "broken.yaml", stages)
    with pytest.raises(WorkflowError) as raised:
        load_workflow(workflow, [override] if override else [])
    text = str(raised.value)
    assert message.replace("{corpus}", str(corpus)) in text
    if override is None or override.startswith("a."):
        assert str(workflow) in text


def test_environment_variables_and_overrides_reach_the_stage_config(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("CORPUS", str(corpus))
    workflow = write_workflow(
        tmp_path / "env.yaml",
        {"a": {"type": "read", "input": "${CORPUS}/pages.jsonl", "text_key": "${TEXT_KEY:-text}"}},
    )
    loaded = load_workflow(workflow, ["a.files_per_part=7", "dask.scheduler=synchronous"])
    assert loaded.stages["a"].input == [f"{corpus}/pages.jsonl"]
    assert loaded.stages["a"].text_key == "text"
    assert loaded.stages["a"].files_per_part == 7
    assert loaded.dask.scheduler == "synchronous"
    with pytest.raises(WorkflowError, match=r"env.yaml.*\$\{MISSING\} is not set"):
        bad = write_workflow(tmp_path / "env.yaml", {"a": {"type": "read", "input": "${MISSING}"}})
        load_workflow(bad)


def test_cli_run_and_status_print_the_dag(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "cli.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    runs = tmp_path / "runs"
    subprocess.run([*GRISTMILL, "run", str(workflow), "--runs-dir", str(runs)], cwd=REPO, env=subprocess_env(),
                   check=True, capture_output=True)
    shown = subprocess.run([*GRISTMILL, "status", str(runs / "cli")], cwd=REPO,
                           env={**subprocess_env(), "COLUMNS": "200"}, check=True, capture_output=True, text=True)
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if line.startswith("│")}
    assert set(rows) == {"pages", "notes", "copy", "export"}
    assert "done" in rows["copy"] and " 20 " in rows["copy"]

    changed = yaml.safe_load(workflow.read_text())
    changed["stages"]["copy"]["drop_shorter_than"] = 5
    workflow.write_text(yaml.safe_dump(changed, sort_keys=False))
    shown = subprocess.run([*GRISTMILL, "status", str(workflow), "--runs-dir", str(runs)], cwd=REPO,
                           env={**subprocess_env(), "COLUMNS": "200"}, check=True, capture_output=True, text=True)
    states = {line.split("│")[1].strip(): line.split("│")[4].strip() for line in shown.stdout.splitlines()
              if line.startswith("│") and line.split("│")[1].strip()}
    assert states == {"pages": "done", "notes": "done", "copy": "stale", "export": "stale"}

    bad = subprocess.run([*GRISTMILL, "run", str(workflow), "--set", "copy.speed=3", "--runs-dir", str(runs)],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stage 'copy', key 'speed': unknown key" in " ".join(bad.stderr.split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quickstart_overrides() -> list[str]:
    return [arg for override in QUICKSTART_TEST_OVERRIDES for arg in ("--set", override)]


def test_quickstart_runs_against_a_scheduler_started_by_hand(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_bin = Path(sys.executable).parent / "dask"
    scheduler = subprocess.Popen([str(dask_bin), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], cwd=tmp_path, env=subprocess_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([str(dask_bin), "worker", address, "--nthreads", "1", "--nworkers", "2",
                               "--no-dashboard"], cwd=tmp_path, env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = subprocess.run(
            [*GRISTMILL, "run", str(REPO / "workflows" / "quickstart.yaml"), "--scheduler", address,
             "--runs-dir", str(tmp_path / "runs"), *quickstart_overrides()],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=540,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"connected to {address}" in result.stderr
        statuses = run_status(tmp_path / "runs" / "quickstart")
        assert statuses and all(s.state == "done" for s in statuses), statuses
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            process.wait(timeout=30)



def test_quickstart_crawls_the_sample_site_through_to_a_trained_model(quickstart_run):
    statuses = {s.name: s for s in run_status(quickstart_run)}
    assert list(statuses) == ["crawl", "extract", "filter", "dedup", "pii", "tokenizers", "pack", "train"]
    assert all(s.state == "done" for s in statuses.values())
    extract = statuses["extract"].counts
    assert statuses["crawl"].counts["pages_fetched"] == extract["in"] > 200
    for upstream, stage in [("extract", "filter"), ("filter", "dedup"), ("dedup", "pii")]:
        assert statuses[stage].counts["in"] == statuses[upstream].counts["kept"]
    assert statuses["pack"].counts["documents"] == statuses["pii"].counts["kept"]
    assert statuses["train"].counts["steps"] == 40


def test_until_runs_a_stage_and_only_what_it_depends_on(tmp_path, corpus):
    workflow = write_workflow(tmp_path / "until.yaml", fan_in_stages(corpus), dask={"scheduler": "synchronous"})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", until="copy")
    assert [s.state for s in run_status(run_dir)] == ["done", "done", "done", "pending"]


def test_web_workflow_reads_warc_files_named_by_the_environment(tmp_path, quickstart_run, monkeypatch):
    monkeypatch.setenv("WARC_GLOB", str(quickstart_run / "crawl" / "warc" / "*.warc.gz"))
    run_dir = run_workflow(REPO / "workflows" / "web.yaml", runs_dir=tmp_path / "runs", until="pii",
                           scheduler="synchronous")
    statuses = {s.name: s for s in run_status(run_dir)}
    assert [n for n, s in statuses.items() if s.state == "done"] == ["extract", "filter", "dedup", "pii"]
    crawled = json.loads((quickstart_run / "crawl" / io.DONE_FILE).read_text())["counts"]["pages_fetched"]
    assert statuses["extract"].counts["in"] == crawled
    kept_langs = set(pq.read_table(run_dir / "filter" / io.KEPT, columns=["lang"]).column("lang").to_pylist())
    assert kept_langs == {"en"}
