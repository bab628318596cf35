"""Common Crawl as an input, against a loopback server that throttles and drops connections like
data.commoncrawl.org does on a busy day. No test touches any address but 127.0.0.1."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from gristmill import DATA_DIR
from gristmill.pipeline import io, storage
from gristmill.pipeline.extract.commoncrawl import CommonCrawlInput, RetrySettings, list_files
from gristmill.pipeline.runner import run_workflow
from gristmill.pipeline.workflow import WorkflowError, load_workflow
from tests.test_extract import write_site_warc

PAGES = sorted((DATA_DIR / "sample_site" / "python").rglob("*.html"))[:18]
FAST_RETRY = {"attempts": 30, "initial_s": 0.005, "max_s": 0.02}


class FlakyDump(ThreadingHTTPServer):
    """Serves files from `root` with Range support; answers 503 SlowDown to every `throttle_every`-th
    request and cuts every `cut_every`-th body half way (after promising the full length)."""

    daemon_threads = True

    def __init__(self, root: Path, throttle_every: int = 3, cut_every: int = 4):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.throttle_every, self.cut_every = root, throttle_every, cut_every
        self.requests = self.throttled = self.cut = 0
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: FlakyDump

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        with server.lock:
            server.requests += 1
            n = server.requests
        path = server.root / self.path.lstrip("/")
        if n % server.throttle_every == 0:
            with server.lock:
                server.throttled += 1
            self.send_response(503, "Slow Down")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if n % server.cut_every == 0 and len(body) > 2:
            with server.lock:
                server.cut += 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def dump(tmp_path: Path) -> Iterator[tuple[FlakyDump, list[str]]]:
    """Three WARC files of real pages in Common Crawl's layout, with their `warc.paths.gz`."""
    root = tmp_path / "dump"
    relative = [f"crawl-data/CC-TEST-2026/segments/1/warc/part-{i}.warc.gz" for i in range(3)]
    for i, rel in enumerate(relative):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pages = [(f"https://docs.example/{p.relative_to(DATA_DIR).as_posix()}", p.read_bytes()) for p in PAGES[i::3]]
        write_site_warc(root / rel, pages)
    (root / "crawl-data/CC-TEST-2026/warc.paths.gz").write_bytes(gzip.compress(("\n".join(relative) + "\n").encode()))
    server = FlakyDump(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, relative
    server.shutdown()
    server.server_close()


def workflow_file(path: Path, commoncrawl: dict, **extract) -> Path:
    stages = {"extract": {"type": "extract", "commoncrawl": commoncrawl, **extract}}
    path.write_text(yaml.safe_dump({"name": path.stem, "dask": {"scheduler": "synchronous"}, "stages": stages}))
    return path


def test_a_throttling_dump_is_read_with_every_record_exactly_once_and_retries_counted(dump, tmp_path):
    server, relative = dump
    workflow = workflow_file(tmp_path / "cc.yaml", {
        "paths_file": server.base_url + "crawl-data/CC-TEST-2026/warc.paths.gz",
        "base_url": server.base_url, "retry": FAST_RETRY})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", console=Console(quiet=True))

    kept = [storage.read_parquet(p) for p in io.kept_parts(run_dir / "extract")]
    urls = [u for table in kept for u in table.column("url").to_pylist()]
    assert sorted(urls) == sorted(f"https://docs.example/{p.relative_to(DATA_DIR).as_posix()}" for p in PAGES)
    assert {s for table in kept for s in table.column("warc_file").to_pylist()} == {server.base_url + r for r in relative}
    stats = io.read_json(run_dir / "extract" / io.STATS_FILE)
    assert server.throttled > 0 and server.cut > 0
    download = stats["download"]
    assert download["files"] == 3
    assert download["retries"] >= 1  # the server throttled or cut some of the WARC requests
    assert download["bytes"] >= sum((server.root / r).stat().st_size for r in relative)


def test_a_local_run_of_the_same_files_extracts_the_same_text(dump, tmp_path):
    server, relative = dump
    workflow = workflow_file(tmp_path / "cc.yaml", {
        "paths_file": str(server.root / "crawl-data/CC-TEST-2026/warc.paths.gz"),
        "base_url": server.base_url, "retry": FAST_RETRY})
    remote = run_workflow(workflow, runs_dir=tmp_path / "remote", console=Console(quiet=True))
    local_workflow = tmp_path / "local.yaml"
    local_workflow.write_text(yaml.safe_dump({"name": "local", "dask": {"scheduler": "synchronous"}, "stages": {
        "extract": {"type": "extract", "input": str(server.root / "crawl-data" / "**" / "*.warc.gz")}}}))
    local = run_workflow(local_workflow, runs_dir=tmp_path / "local", console=Console(quiet=True))

    def texts(run_dir):
        tables = [storage.read_parquet(p) for p in io.kept_parts(run_dir / "extract")]
        return sorted((u, t) for table in tables for u, t in zip(table.column("url").to_pylist(),
                                                                  table.column("text").to_pylist()))

    assert texts(remote) == texts(local) and len(texts(local)) == len(PAGES)


def test_sample_files_and_max_files_choose_from_the_paths_list(dump):
    server, relative = dump
    settings = {"paths_file": server.base_url + "crawl-data/CC-TEST-2026/warc.paths.gz", "base_url": server.base_url,
                "retry": RetrySettings(**FAST_RETRY)}
    assert list_files(CommonCrawlInput(**settings)) == [server.base_url + r for r in relative]
    assert list_files(CommonCrawlInput(**settings, max_files=2)) == [server.base_url + r for r in relative[:2]]
    sampled = list_files(CommonCrawlInput(**settings, sample_files=2, seed=7))
    assert len(sampled) == 2 and set(sampled) < {server.base_url + r for r in relative}
    assert list_files(CommonCrawlInput(**settings, sample_files=2, seed=7)) == sampled  # the seed fixes the draw
    s3 = list_files(CommonCrawlInput(**{**settings, "base_url": "s3://commoncrawl/"}, max_files=1))
    assert s3 == ["s3://commoncrawl/" + relative[0]]


def test_cache_dir_keeps_whole_copies_and_serves_the_next_run_from_them(dump, tmp_path):
    server, relative = dump
    cache = tmp_path / "cache"
    workflow = workflow_file(tmp_path / "cached.yaml", {
        "paths_file": server.base_url + "crawl-data/CC-TEST-2026/warc.paths.gz", "base_url": server.base_url,
        "cache_dir": str(cache), "retry": FAST_RETRY})
    run_workflow(workflow, runs_dir=tmp_path / "runs", console=Console(quiet=True))
    for rel in relative:
        assert (cache / rel).read_bytes() == (server.root / rel).read_bytes()
    requests = server.requests
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "again", console=Console(quiet=True))
    assert server.requests - requests <= 3  # the paths list (and its retries), never the WARC files
    assert io.read_json(run_dir / "extract" / io.STATS_FILE)["download"]["bytes"] == 0


def test_a_file_that_never_stops_failing_gives_up_with_a_clear_error(tmp_path):
    server = FlakyDump(tmp_path, throttle_every=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = CommonCrawlInput(paths_file=server.base_url + "warc.paths.gz", base_url=server.base_url,
                                    retry=RetrySettings(attempts=4, initial_s=0.001, max_s=0.002))
        with pytest.raises(OSError, match="gave up after 4 attempts"):
            list_files(settings)
    finally:
        server.shutdown()
        server.server_close()


def test_config_errors_name_the_key(tmp_path):
    bad = workflow_file(tmp_path / "bad.yaml", {"paths_file": "x.gz", "sample_file": 2})
    with pytest.raises(WorkflowError, match="sample_file"):
        load_workflow(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"name": "empty", "stages": {"extract": {"type": "extract"}}}))
    with pytest.raises(WorkflowError, match="key 'input': stage type 'extract' needs an input"):
        load_workflow(empty)
