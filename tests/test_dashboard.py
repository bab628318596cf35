"""The dashboard renders every page of a real run headless (AppTest) and shows the run's numbers;
a missing, failed, running or half-written stage gives a clear message, never an exception."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from gristmill.dashboards.crawl_page import ERRORS_SHOWN
from gristmill.dashboards.dedup_page import word_diff
from gristmill.dashboards.pii_page import highlight_spans
from gristmill.dashboards.run_data import sample_rows
from gristmill.pipeline.runner import run_workflow
from gristmill.pipeline.workflow import DATA_DIR

APP = Path(__file__).resolve().parents[1] / "gristmill" / "dashboards" / "app.py"
SITE = DATA_DIR / "sample_site"


def small_pipeline() -> dict:
    """The whole DAG over the sample site served on loopback, sized to run in seconds."""
    return {
        "name": "dash",
        "dask": {"scheduler": "synchronous"},
        "stages": {
            "crawl": {"type": "crawl", "serve_directory": str(SITE), "delay_s": 0, "max_depth": 5,
                      "per_host_concurrency": 4},
            "extract": {"type": "extract", "input": "crawl"},
            "filter": {"type": "filter", "input": "extract"},
            "dedup": {"type": "dedup", "input": "filter"},
            "pii": {"type": "pii", "input": "dedup"},
            "tokenizers": {"type": "tokenizers", "input": "pii", "show_progress": False, "tokenizers": [
                {"name": "bpe", "kind": "bpe", "vocab_size": 600},
                {"name": "unigram", "kind": "unigram", "vocab_size": 600}]},
            "pack": {"type": "pack", "input": ["pii", "tokenizers"], "tokenizer": "bpe", "val_fraction": 0.1},
            "train": {"type": "train", "input": "pack", "n_layer": 1, "n_head": 2, "n_embd": 32, "seq_len": 32,
                      "batch_size": 4, "max_steps": 10, "warmup_steps": 2, "eval_every": 5, "checkpoint_every": 5,
                      "log_every": 1, "progress": False},
        },
    }


@pytest.fixture(scope="session")
def dashboard_run(request, tmp_path_factory) -> Path:
    """The project's quickstart run when the suite provides one, else a small run of every stage."""
    try:
        return request.getfixturevalue("quickstart_run")
    except pytest.FixtureLookupError:
        pass
    base = tmp_path_factory.mktemp("dashboard")
    workflow = base / "dash.yaml"
    workflow.write_text(yaml.safe_dump(small_pipeline(), sort_keys=False))
    return run_workflow(workflow, runs_dir=base / "runs")


def done(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "_DONE.json").read_text())


def stages_of(run: Path, stage_type: str) -> list[str]:
    stages = yaml.safe_load((run / "workflow.yaml").read_text())["stages"]
    return [name for name, s in stages.items() if s["type"] == stage_type]


def render(target: Path, page: str, monkeypatch, **query) -> AppTest:
    monkeypatch.setenv("GRISTMILL_RUN", str(target))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["page"] = page
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def messages(at: AppTest) -> str:
    return " ".join(str(e.value) for kind in (at.info, at.warning, at.error, at.success) for e in kind)


def fmt(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# Every page on a complete run


def test_overview_counts_equal_the_done_manifests(dashboard_run, monkeypatch):
    at = render(dashboard_run, "overview", monkeypatch)
    assert not at.error
    shown = metrics(at)
    stages = yaml.safe_load((dashboard_run / "workflow.yaml").read_text())["stages"]
    assert shown["stages done"] == f"{len(stages)} / {len(stages)}"
    document_stages = [s for s in stages if "kept" in done(dashboard_run, s)["counts"]]
    assert shown["documents in"] == fmt(done(dashboard_run, document_stages[0])["counts"]["in"])
    assert shown["documents out"] == fmt(done(dashboard_run, document_stages[-1])["counts"]["kept"])
    pack = done(dashboard_run, stages_of(dashboard_run, "pack")[0])["counts"]
    assert shown["tokens packed"] == fmt(pack["train_tokens"] + pack["val_tokens"])
    table = at.dataframe[0].value
    assert list(table["stage"]) == list(stages)
    for row in table.itertuples():
        assert row.state == "done"
        if "kept" in done(dashboard_run, row.stage)["counts"]:
            assert row.kept == done(dashboard_run, row.stage)["counts"]["kept"]


def test_overview_buttons_open_the_stage_pages(dashboard_run, monkeypatch):
    at = render(dashboard_run, "overview", monkeypatch)
    at.button(key=f"open-{stages_of(dashboard_run, 'dedup')[0]}").click().run()
    assert not at.exception
    assert at.sidebar.radio(key="page").value == "dedup"
    assert at.title[0].value == "Dedup"


def test_crawl_page_counts_equal_the_crawl_log(dashboard_run, monkeypatch):
    at = render(dashboard_run, "crawl", monkeypatch)
    assert not at.error
    stage = stages_of(dashboard_run, "crawl")[0]
    log = pq.read_table(dashboard_run / stage / "crawl_log.parquet").to_pylist()
    # pages: 2xx answers to URLs of the crawl (robots.txt fetches have no depth)
    fetched = [r for r in log if r["status"] and 200 <= r["status"] < 300 and r["error"] is None
               and r["depth"] is not None]
    shown = metrics(at)
    assert shown["pages fetched"] == fmt(done(dashboard_run, stage)["counts"]["pages_fetched"]) == fmt(len(fetched))
    assert shown["hosts"] == "1"  # the sample site on 127.0.0.1
    errors = at.dataframe[0].value
    failed = [r for r in log if r["error"] is not None or (r["status"] or 0) >= 400]
    assert len(errors) == min(len(failed), ERRORS_SHOWN)


def test_extract_page_counts_languages_and_shows_html_beside_text(dashboard_run, monkeypatch):
    at = render(dashboard_run, "extract", monkeypatch)
    assert not at.error
    counts = done(dashboard_run, stages_of(dashboard_run, "extract")[0])["counts"]
    shown = metrics(at)
    assert shown["records"] == fmt(counts["in"])
    assert shown["documents kept"] == fmt(counts["kept"])
    assert int(shown["languages"]) >= 5  # the handbook is in nine languages
    html, text = at.code[0].value, at.code[1].value
    assert "<html" in html.lower()
    assert text and "<" not in text[:200]


def test_filters_page_counts_and_threshold_preview(dashboard_run, monkeypatch):
    at = render(dashboard_run, "filters", monkeypatch)
    assert not at.error
    stage = stages_of(dashboard_run, "filter")[0]
    counts = done(dashboard_run, stage)["counts"]
    assert metrics(at)["kept"] == fmt(counts["kept"])
    assert metrics(at)["removed"] == fmt(counts["removed"])
    at.selectbox(key="filter-signal").set_value("gopher_words").run()
    slider = at.slider(key="slider-gopher_words")
    low, high = slider.value
    assert metrics(at)["documents measured"] == fmt(counts["in"])
    before = int(metrics(at)["would pass at preview"].replace(",", ""))
    slider.set_value((low, min(high, 50.0))).run()  # keep only very short documents
    after = int(metrics(at)["would pass at preview"].replace(",", ""))
    assert after < before
    for column in at.selectbox(key="filter-signal").options:  # every signal draws, with or without bounds
        at.selectbox(key="filter-signal").set_value(column).run()
        assert not at.error and not at.exception, column
    stats = json.loads((dashboard_run / stage / "stats.json").read_text())
    rule = max(stats["removed_by_rule"], key=stats["removed_by_rule"].get)
    assert at.selectbox(key="filter-rule").value == rule
    assert any(rule in e.label for e in at.expander)


def test_dedup_page_counts_and_diffs_a_cluster(dashboard_run, monkeypatch):
    at = render(dashboard_run, "dedup", monkeypatch)
    assert not at.error
    stage = stages_of(dashboard_run, "dedup")[0]
    stats = json.loads((dashboard_run / stage / "stats.json").read_text())
    assert metrics(at)["duplicates removed"] == fmt(done(dashboard_run, stage)["counts"]["removed"])
    assert metrics(at)["clusters"] == fmt(stats["clusters"])
    assert at.selectbox(key="dedup-cluster").value  # the largest cluster is chosen
    assert "Survivor" in " ".join(m.value for m in at.markdown)


def test_pii_page_counts_and_marks_replaced_spans(dashboard_run, monkeypatch):
    at = render(dashboard_run, "pii", monkeypatch)
    assert not at.error
    stage = stages_of(dashboard_run, "pii")[0]
    stats = json.loads((dashboard_run / stage / "stats.json").read_text())
    assert metrics(at)["documents with PII"] == fmt(stats["documents_with_pii"])
    assert metrics(at)["spans replaced"] == fmt(sum(stats["found"].values()))


def test_tokenizers_page_compares_and_splits_typed_text(dashboard_run, monkeypatch):
    at = render(dashboard_run, "tokenizers", monkeypatch)
    assert not at.error
    stage = dashboard_run / stages_of(dashboard_run, "tokenizers")[0]
    trained = sorted(p.parent.name for p in stage.glob("*/tokenizer.json"))
    assert metrics(at)["tokenizers"] == str(len(trained))
    assert sorted(at.dataframe[0].value["tokenizer"]) == trained
    meta = json.loads((dashboard_run / stages_of(dashboard_run, "pack")[0] / "meta.json").read_text())
    assert metrics(at)["train tokens"] == fmt(meta["tokens"]["train"])
    at.text_area(key="tokenizer-text").set_value("hello hello world").run()
    from tokenizers import Tokenizer

    for name in trained:
        ids = Tokenizer.from_file(str(stage / name / "tokenizer.json")).encode(
            "hello hello world", add_special_tokens=False).ids
        assert " ".join(map(str, ids)) in [c.value for c in at.code]


def test_training_page_shows_the_last_logged_step(dashboard_run, monkeypatch):
    at = render(dashboard_run, "training", monkeypatch)
    assert not at.error
    stage = dashboard_run / stages_of(dashboard_run, "train")[0]
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    max_steps = yaml.safe_load((dashboard_run / "workflow.yaml").read_text())["stages"][stage.name]["max_steps"]
    assert metrics(at)["step"] == f"{records[-1]['step']} / {max_steps}"
    assert metrics(at)["loss"] == f"{records[-1]['loss']:.3f}"
    samples = (stage / "samples.jsonl").read_text().splitlines()
    assert len([e for e in at.expander if e.label.startswith("step ")]) == len(samples)


def test_pii_highlights_mark_the_found_value_before_and_its_replacement_after(dashboard_run):
    stage = dashboard_run / stages_of(dashboard_run, "pii")[0]
    rows = [r for p in sorted((stage / "kept").glob("*.parquet"))
            for r in pq.read_table(p, columns=["text", "pii_spans"]).to_pylist() if r["pii_spans"]]
    assert rows, "the sample site has e-mail addresses for the pii stage to find"
    for row in rows:
        before, after = highlight_spans(row["text"], row["pii_spans"])
        for span in row["pii_spans"]:
            assert f">{html.escape(span['original'])}</mark>" in before
            assert f">{html.escape(span['replacement'])}</mark>" in after
            assert html.escape(span["original"]) not in after


def test_word_diff_marks_only_the_words_that_differ():
    survivor = "Debian stable is the default choice for servers."
    duplicate = "Debian stable is the usual choice for servers & desktops."
    left, right = word_diff(survivor, duplicate)
    assert '<del style="background:#ffcdd2">default</del>' in left
    assert '<ins style="background:#c8e6c9; text-decoration:none">usual</ins>' in right
    assert "servers &amp; desktops." in right and "Debian stable is the " in left


def test_sampled_rows_come_from_the_right_row_groups(tmp_path):
    import pyarrow as pa

    parts = []
    for part in range(3):  # 3 parts of 100 rows in row groups of 7: rows cross group boundaries
        ids = [f"{part}-{i}" for i in range(100)]
        table = pa.table({"id": ids, "parity": [str(i % 2) for i in range(100)], "text": [f"text of {x}" for x in ids]})
        parts.append(tmp_path / f"part-{part:05d}.parquet")
        pq.write_table(table, parts[-1], row_group_size=7)
    rows = sample_rows(parts, ["id", "text"], k=40, seed=3, where=("parity", "1")).to_pylist()
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    for row in rows:
        assert int(row["id"].split("-")[1]) % 2 == 1
        assert row["text"] == f"text of {row['id']}"
    assert sample_rows(parts, ["id", "missing"], k=5).column("missing").null_count == 5


# ---------------------------------------------------------------------------------------------
# Stages that are missing, failed, running or half-written


@pytest.fixture
def damaged_run(dashboard_run, tmp_path) -> Path:
    """A copy of the run that tests may break."""
    copy = tmp_path / "runs" / dashboard_run.name
    shutil.copytree(dashboard_run, copy, ignore=shutil.ignore_patterns("*.pt"))
    return copy


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_missing_stage_folder_says_pending(damaged_run, monkeypatch):
    stage = stages_of(damaged_run, "dedup")[0]
    shutil.rmtree(damaged_run / stage)
    at = render(damaged_run, "dedup", monkeypatch)
    assert f"Stage `{stage}` has not started yet (pending)" in messages(at)
    overview = render(damaged_run, "overview", monkeypatch)
    assert overview.dataframe[0].value.set_index("stage").loc[stage, "state"] == "pending"


def test_failed_stage_shows_the_error_from_failed_json(damaged_run, monkeypatch):
    stage = damaged_run / stages_of(damaged_run, "pii")[0]
    (stage / "_DONE.json").unlink()
    (stage / "_FAILED.json").write_text(json.dumps(
        {"stage": stage.name, "error": "ValueError: pii: input has no `text` column",
         "traceback": "Traceback (most recent call last):\n  ...\nValueError: pii"}))
    at = render(damaged_run, "pii", monkeypatch)
    assert [e.value for e in at.error] == [f"Stage `{stage.name}` failed: ValueError: pii: input has no `text` column"]
    assert at.expander[0].label == "traceback"
    overview = render(damaged_run, "overview", monkeypatch)
    assert any("ValueError: pii" in e.value for e in overview.error)


def test_half_written_stage_says_interrupted(damaged_run, monkeypatch):
    stage = damaged_run / stages_of(damaged_run, "tokenizers")[0]
    (stage / "_DONE.json").unlink()
    (stage / "_STARTED.json").write_text(json.dumps({"stage": stage.name, "pid": dead_pid()}))
    (stage / "stats.json").write_text('{"stage": "tokenizers", "counts": {"tok')
    at = render(damaged_run, "tokenizers", monkeypatch)
    assert f"Stage `{stage.name}` started but its process is gone (interrupted)" in messages(at)
    assert not at.error


def test_done_stage_with_truncated_stats_says_unreadable(damaged_run, monkeypatch):
    stage = damaged_run / stages_of(damaged_run, "filter")[0]
    (stage / "stats.json").write_text('{"stage": "filter", "removed_by_rule": {"gopher')
    at = render(damaged_run, "filters", monkeypatch)
    assert "stats are unreadable (half-written?)" in messages(at)
    assert str(stage / "stats.json") in messages(at)


def test_running_training_shows_logged_steps_and_skips_a_half_line(damaged_run, monkeypatch):
    stage = damaged_run / stages_of(damaged_run, "train")[0]
    (stage / "_DONE.json").unlink()
    (stage / "_STARTED.json").write_text(json.dumps({"stage": stage.name, "pid": os.getpid()}))
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    (stage / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    at = render(damaged_run, "training", monkeypatch)
    assert f"Stage `{stage.name}` is training" in messages(at)
    assert metrics(at)["step"].startswith(f"{json.loads(lines[2])['step']} / ")
    assert not at.error


def test_folder_that_is_not_a_run_is_named_in_an_error(tmp_path, monkeypatch):
    at = render(tmp_path, "overview", monkeypatch)
    assert [e.value for e in at.error] == [
        f"{tmp_path}: no gristmill run here (a run folder holds `workflow.yaml`; a folder of runs holds such folders)."]


def test_folder_of_runs_chooses_a_run_and_compares_two(dashboard_run, damaged_run, monkeypatch):
    other = damaged_run.parent / "other"
    shutil.copytree(damaged_run, other)
    train = stages_of(other, "train")[0]
    settings = yaml.safe_load((other / "workflow.yaml").read_text())
    settings["stages"][train]["max_steps"] += 10
    (other / "workflow.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    at = render(damaged_run.parent, "overview", monkeypatch, run=damaged_run.name)
    assert at.sidebar.selectbox(key="run").options == sorted([damaged_run.name, "other"])
    assert at.selectbox(key="compare-run").value.name == "other"
    compared = at.dataframe[-2].value
    assert list(compared["stage"]) == list(settings["stages"])
    assert compared[f"kept · {damaged_run.name}"].equals(compared["kept · other"])
    differing = at.dataframe[-1].value
    assert list(differing["setting"]) == [f"{train}.max_steps"]


# ---------------------------------------------------------------------------------------------
# In a browser: `gristmill dashboard` served on loopback, every page loaded by headless Chromium

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
# What each page must show once drawn (text on the page, then a CSS selector).
PAGE_CHECKS = {
    "overview": ("Document funnel", '[data-testid="stGraphVizChart"] svg'),
    "crawl": ("Top hosts", ".js-plotly-plot"),
    "extract": ("Source HTML", ".js-plotly-plot"),
    "filters": ("Signals and thresholds", '[data-testid="stSlider"]'),
    "dedup": ("Survivor", ".js-plotly-plot"),
    "pii": ("Found per type", '[data-testid="stMetric"]'),
    "tokenizers": ("Try it", 'span[title^="id "]'),
    "training": ("Samples at checkpoints", ".js-plotly-plot"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, server: subprocess.Popen, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"gristmill dashboard exited with {server.returncode}: {server.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"gristmill dashboard did not answer on 127.0.0.1:{port} within {timeout_s} s")


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (.ci/run installs Debian's chromium)")
def test_every_page_loads_in_headless_chromium(dashboard_run):
    from playwright.sync_api import sync_playwright

    checks = dict(PAGE_CHECKS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gristmill.cli", "dashboard", str(dashboard_run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        wait_until_serving(port, server)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            for name, (text, selector) in checks.items():
                page.goto(f"http://127.0.0.1:{port}/?page={name}")
                page.get_by_text(text, exact=False).first.wait_for(timeout=20_000)
                page.locator(selector).first.wait_for(timeout=20_000)
                page.wait_for_timeout(300)  # let charts finish their first layout
                assert page.locator('[data-testid="stException"]').count() == 0, name
                assert page.get_by_text("could not be drawn").count() == 0, name
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    assert {p.stem for p in ARTIFACTS.glob("*.png")} >= set(checks)


def test_running_crawl_shows_the_log_parts_written_so_far(damaged_run, monkeypatch):
    stage = damaged_run / stages_of(damaged_run, "crawl")[0]
    (stage / "_DONE.json").unlink()
    (stage / "_STARTED.json").write_text(json.dumps({"stage": stage.name, "pid": os.getpid()}))
    log = pq.read_table(stage / "crawl_log.parquet")
    (stage / "crawl_log.parquet").unlink()
    shutil.rmtree(stage / "crawl_log")
    (stage / "crawl_log").mkdir()
    pq.write_table(log.slice(0, 30), stage / "crawl_log" / "part-00000.parquet")
    pq.write_table(log.slice(30, 20), stage / "crawl_log" / "part-00001.parquet")
    at = render(damaged_run, "crawl", monkeypatch)
    assert f"Stage `{stage.name}` is running: showing the 2 log parts written so far" in messages(at)
    assert metrics(at)["URLs tried"] == "50"
    assert not at.error
