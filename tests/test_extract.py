"""The extract stage: real WARC/WET/ARC files built from the bundled sample site, plus broken ones."""

from __future__ import annotations

import gzip
import io as bytes_io
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.extract.archive import archive_spans
from gristmill.pipeline.extract.stage import (
    ExtractConfig,
    decode_html,
    extract_archive,
    html_to_text,
    read_record_html,
)
from gristmill.pipeline.extract.text import normalize_text
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents
from gristmill.pipeline.languages import language_code
from gristmill.pipeline.runner import run_workflow

SITE = DATA_DIR / "sample_site"
BASE_URL = "http://127.0.0.1:8000/"
APPETITE = SITE / "python" / "tutorial" / "appetite.html"
TRANSLATED = {  # pages of the handbook that are translated (many others are still English)
    "fr": "handbook/fr-FR/sect.who-is-this-book-for.html",
    "de": "handbook/de-DE/sect.who-is-this-book-for.html",
    "ja": "handbook/ja-JP/sect.who-is-this-book-for.html",
    "zh": "handbook/zh-CN/sect.who-is-this-book-for.html",
    "ru": "handbook/ru-RU/sect.who-is-this-book-for.html",
}
RUSSIAN = "Привет! Это страница на русском языке, сохранённая в кодировке Windows-1251. " * 4
JAPANESE = "これはシフトJISで書かれた日本語のページです。文字化けせずに読めるはずです。" * 4


def extract_file(path: Path, **settings):
    """The extract stage over one whole file, as one work unit."""
    config = ExtractConfig(type="extract", **settings)
    return extract_archive(archive_spans(path, config.split_bytes), config)


def page_urls(relative_paths: list[str]) -> list[tuple[str, bytes]]:
    return [(BASE_URL + rel, (SITE / rel).read_bytes()) for rel in relative_paths]


def write_site_warc(path: Path, pages: list[tuple[str, bytes]], gzip_members: bool = True) -> Path:
    """A WARC as a crawler writes it: warcinfo, then a request and a response record per page."""
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=gzip_members)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "gristmill-tests"}))
        for url, body in pages:
            request = StatusAndHeaders("GET / HTTP/1.1", [("Host", "127.0.0.1")], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            response = writer.create_warc_record(url, "response", payload=bytes_io.BytesIO(body), http_headers=headers)
            response.rec_headers.add_header("WARC-Identified-Payload-Type", "text/html")
            writer.write_record(response)
    return path


def raw_record(url: str, block: bytes, record_type: str = "response",
               content_type: str = "application/http; msgtype=response") -> bytes:
    """One WARC record written byte by byte, so that its block can be as broken as a test needs."""
    head = (
        f"WARC/1.0\r\nWARC-Type: {record_type}\r\nWARC-Record-ID: <urn:uuid:{uuid.uuid4()}>\r\n"
        f"WARC-Date: 2024-05-01T12:00:00Z\r\nWARC-Target-URI: {url}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(block)}\r\n\r\n"
    ).encode()
    return head + block + b"\r\n\r\n"


def http_block(body: bytes, content_type: str = "text/html", status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}\r\n".encode() + body


def rows_by_url(table) -> dict[str, dict]:
    return {row["url"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def site_warc(tmp_path_factory) -> Path:
    rels = ["python/tutorial/appetite.html", "python/tutorial/venv.html", "postgresql/tutorial-join.html",
            *TRANSLATED.values()]
    return write_site_warc(tmp_path_factory.mktemp("warc") / "site.warc.gz", page_urls(rels))


@pytest.fixture(scope="module")
def site_output(site_warc: Path):
    return extract_file(site_warc)


def test_known_page_keeps_main_paragraph_and_drops_navigation(site_output, site_warc):
    row = rows_by_url(site_output.kept)[BASE_URL + "python/tutorial/appetite.html"]
    assert "If you do much work on computers, eventually you find that there’s some task" in row["text"]
    for navigation in ("Quick search", "Previous topic", "Next topic", "Report a Bug", "Navigation"):
        assert navigation in APPETITE.read_text()
        assert navigation not in row["text"]
    assert row["title"] == "1. Whetting Your Appetite — Python 3.11.2 documentation"
    assert row["lang"] == "en" and row["lang_score"] > 0.9
    assert row["source"] == row["warc_file"] == str(site_warc)
    assert row["http_status"] == 200 and row["charset"] == "utf-8"
    assert row["fetch_time"] is not None and row["warc_record_id"].startswith("<urn:uuid:")
    # The pointer leads back to the raw page, as the dashboard shows it beside the text.
    assert read_record_html(row["warc_file"], row["warc_offset"]) == APPETITE.read_text()


@pytest.mark.parametrize("lang", sorted(TRANSLATED))
def test_language_of_translated_pages(site_output, lang):
    row = rows_by_url(site_output.kept)[BASE_URL + TRANSLATED[lang]]
    assert (row["lang"], row["lang_score"] > 0.9) == (lang, True)


def test_requests_and_warcinfo_are_not_documents(site_output):
    assert site_output.kept.num_rows == 3 + len(TRANSLATED)
    assert site_output.removed.num_rows == 0
    assert site_output.stats["records_by_type"] == {"warcinfo": 1, "request": 8, "response": 8}
    assert site_output.stats["languages"] == {"en": 3, "fr": 1, "de": 1, "ja": 1, "zh": 1, "ru": 1}
    assert sum(site_output.stats["text_chars"]["counts"]) == 8
    assert len(set(site_output.kept.column("id").to_pylist())) == 8


@pytest.fixture(scope="module")
def broken_output(tmp_path_factory):
    """One gzipped WARC with a good page and every kind of bad record, one gzip member each."""
    good = (SITE / "python/tutorial/venv.html").read_bytes()
    records = {
        "good": http_block(good),
        "bad-headers": b"this is not an HTTP status line\r\nnor: a header\r\n\r\n<p>x</p>",
        "binary": http_block(bytes(range(256)) * 64, content_type="image/png"),
        "binary-as-html": http_block(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64, content_type="text/html"),
        "empty": http_block(b""),
        "only-markup": http_block(b"<html><head><script>var a = 1;</script></head><body></body></html>"),
        "not-found": http_block(b"<html><body><p>no such page</p></body></html>", status="404 Not Found"),
        "cp1251": http_block(f"<html><body><p>{RUSSIAN}</p></body></html>".encode("cp1251")),
        "cp1251-declared-utf8": http_block(f"<html><body><p>{RUSSIAN}</p></body></html>".encode("cp1251"),
                                           content_type="text/html; charset=utf-8"),
        "shift-jis": http_block(
            f'<html><head><meta charset="shift_jis"></head><body><p>{JAPANESE}</p></body></html>'.encode("shift_jis")
        ),
        "gzip-encoded": http_block(gzip.compress(good), extra="Content-Encoding: gzip\r\n"),
        "bad-gzip-encoding": http_block(b"not gzip at all", extra="Content-Encoding: gzip\r\n"),
    }
    path = tmp_path_factory.mktemp("broken") / "broken.warc.gz"
    path.write_bytes(b"".join(gzip.compress(raw_record(f"http://127.0.0.1/{name}", block))
                              for name, block in records.items()))
    return extract_file(path)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("bad-headers", "extract:bad_http"),
        ("binary", "extract:not_html"),
        ("binary-as-html", "extract:undecodable"),
        ("empty", "extract:empty_text"),
        ("only-markup", "extract:empty_text"),
        ("not-found", "extract:http_status"),
        ("bad-gzip-encoding", "extract:bad_content_encoding"),
    ],
)
def test_malformed_record_becomes_removed_row_with_reason(broken_output, name, reason):
    row = rows_by_url(broken_output.removed)[f"http://127.0.0.1/{name}"]
    assert row["reason"].split(" ", 1)[0] == reason
    assert row["text"] is None and row["warc_offset"] >= 0


def test_every_record_is_kept_or_removed_once(broken_output):
    assert broken_output.kept.num_rows + broken_output.removed.num_rows == 12
    assert broken_output.stats["removed_by_reason"] == {
        "extract:bad_http": 1, "extract:not_html": 1, "extract:undecodable": 1, "extract:empty_text": 2,
        "extract:http_status": 1, "extract:bad_content_encoding": 1,
    }


def test_charsets_are_detected_when_missing_or_wrong(broken_output):
    kept = rows_by_url(broken_output.kept)
    for name in ("cp1251", "cp1251-declared-utf8"):
        assert kept[f"http://127.0.0.1/{name}"]["text"] == RUSSIAN.strip()
        assert kept[f"http://127.0.0.1/{name}"]["charset"] == "cp1251"
        assert kept[f"http://127.0.0.1/{name}"]["lang"] == "ru"
    assert kept["http://127.0.0.1/shift-jis"]["text"] == JAPANESE
    assert kept["http://127.0.0.1/shift-jis"]["lang"] == "ja"
    assert "Python" in kept["http://127.0.0.1/gzip-encoded"]["text"]
    assert kept["http://127.0.0.1/gzip-encoded"]["text"] == kept["http://127.0.0.1/good"]["text"]


def test_decode_html_prefers_bom_then_header():
    assert decode_html(b"\xef\xbb\xbf<p>caf\xc3\xa9</p>", "cp1251") == ("<p>café</p>", "utf-8-sig")
    assert decode_html("<p>café</p>".encode("cp1252"), "latin1") == ("<p>café</p>", "cp1252")
    assert decode_html(b"<p>plain</p>", "no-such-charset") == ("<p>plain</p>", "cp1252")


def test_page_over_the_size_limit_is_removed_without_being_read(tmp_path):
    huge = b"<html><body>" + b"<p>" + b"filler words " * 4_000_000 + b"</p></body></html>"  # ~52 MB
    path = tmp_path / "huge.warc"
    path.write_bytes(raw_record("http://127.0.0.1/huge", http_block(huge))
                     + raw_record("http://127.0.0.1/small", http_block(b"<p>a small page after the huge one</p>")))
    output = extract_file(path)
    removed = rows_by_url(output.removed)["http://127.0.0.1/huge"]
    assert removed["reason"].startswith("extract:too_large")
    assert output.stats["payload_bytes"] < 1_000
    assert rows_by_url(output.kept)["http://127.0.0.1/small"]["text"] == "a small page after the huge one"


def test_truncated_gzip_keeps_records_before_the_damage(site_output, site_warc, tmp_path):
    offsets = site_output.kept.column("warc_offset").to_pylist()
    cut_at = offsets[3] + (offsets[4] - offsets[3]) * 6 // 10  # inside the 4th page's compressed body
    truncated = tmp_path / "truncated.warc.gz"
    truncated.write_bytes(site_warc.read_bytes()[:cut_at])
    cut = extract_file(truncated)
    assert cut.kept.column("text").to_pylist() == site_output.kept.column("text").to_pylist()[:3]
    assert cut.removed.num_rows == 1
    damaged = cut.removed.to_pylist()[0]
    assert damaged["reason"].startswith(f"extract:truncated ({truncated}: bytes {offsets[3]:,}-{cut_at:,} skipped")
    assert damaged["reason"].endswith("the file ends inside this gzip member)")
    # What the cut member still tells (its WARC headers) names the page that was lost.
    assert damaged["warc_offset"] == offsets[3] and damaged["url"] == site_output.kept.column("url")[3].as_py()
    assert damaged["id"] == site_output.kept.column("id")[3].as_py()
    assert cut.stats["skipped_bytes"] == cut_at - offsets[3]


def test_file_cut_inside_a_request_record_says_so(site_output, site_warc, tmp_path):
    offsets = site_output.kept.column("warc_offset").to_pylist()
    truncated = tmp_path / "cut-request.warc.gz"
    truncated.write_bytes(site_warc.read_bytes()[: offsets[2] - 100])  # inside the 3rd page's request
    cut = extract_file(truncated)
    assert cut.kept.num_rows == 2
    assert cut.removed.num_rows == 1
    reason = cut.removed.column("reason")[0].as_py()
    assert reason.startswith("extract:truncated (") and reason.endswith("the file ends inside this gzip member)")
    assert cut.removed.column("url")[0].as_py() == site_output.kept.column("url")[2].as_py()


def test_damaged_member_in_the_middle_loses_only_that_record(site_output, site_warc, tmp_path):
    offsets = site_output.kept.column("warc_offset").to_pylist()
    data = bytearray(site_warc.read_bytes())
    middle = offsets[3] + (offsets[4] - offsets[3]) // 2  # inside the 4th page's response member
    data[middle : middle + 200] = bytes(b ^ 0x5A for b in data[middle : middle + 200])
    corrupt = tmp_path / "corrupt.warc.gz"
    corrupt.write_bytes(bytes(data))
    output = extract_file(corrupt)
    expected = site_output.kept.to_pylist()
    assert output.kept.to_pylist() == [{**row, "warc_file": str(corrupt), "source": str(corrupt)}
                                       for i, row in enumerate(expected) if i != 3]
    (damaged,) = output.removed.to_pylist()
    assert damaged["reason"].startswith(f"extract:damaged ({corrupt}: bytes {offsets[3]:,}-")
    assert damaged["warc_offset"] == offsets[3] and damaged["url"] == expected[3]["url"]
    assert 0 < output.stats["skipped_bytes"] < offsets[4] - offsets[3]
    assert output.stats["removed_by_reason"] == {"extract:damaged": 1}


def test_garbage_between_members_is_skipped_up_to_the_next_record(site_output, site_warc, tmp_path):
    offsets = site_output.kept.column("warc_offset").to_pylist()
    data = site_warc.read_bytes()
    spliced = tmp_path / "spliced.warc.gz"
    garbage = b"\x1f\x8b\x08 not a member" * 50  # looks like gzip members, but none inflates
    spliced.write_bytes(data[: offsets[5]] + garbage + data[offsets[5]:])
    output = extract_file(spliced)
    assert output.kept.column("text").to_pylist() == site_output.kept.column("text").to_pylist()
    (skipped,) = output.removed.to_pylist()
    end = offsets[5] + len(garbage)
    assert skipped["reason"].startswith(f"extract:damaged ({spliced}: bytes {offsets[5]:,}-{end:,} skipped")
    assert output.stats["skipped_bytes"] == len(garbage)


def test_wet_conversion_records_are_text_documents(tmp_path):
    path = tmp_path / "sample.warc.wet.gz"
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for lang, text in (("fr", "Ceci est un texte extrait d'une page web française, sans balises."),
                           ("de", "Dies ist ein aus einer deutschen Webseite extrahierter Text ohne Auszeichnung.")):
            record = writer.create_warc_record(f"http://127.0.0.1/{lang}", "conversion",
                                               payload=bytes_io.BytesIO(text.encode()),
                                               warc_content_type="text/plain")
            writer.write_record(record)
    output = extract_file(path)
    kept = rows_by_url(output.kept)
    assert kept["http://127.0.0.1/fr"]["text"].startswith("Ceci est un texte") and kept["http://127.0.0.1/fr"]["lang"] == "fr"
    assert kept["http://127.0.0.1/de"]["lang"] == "de" and kept["http://127.0.0.1/de"]["http_status"] is None


def arc_file(pages: list[tuple[str, bytes]]) -> bytes:
    """An ARC v1 file: a filedesc record, then one record per page (URL IP date type length)."""
    desc = b"1 0 InternetArchive\nURL IP-address Archive-date Content-type Archive-length\n"
    out = b"filedesc://sample.arc 0.0.0.0 20240101000000 text/plain %d\n" % len(desc) + desc + b"\n"
    for url, body in pages:
        block = http_block(body, content_type="text/html; charset=utf-8")
        out += b"%s 127.0.0.1 20240102030405 text/html %d\n" % (url.encode(), len(block)) + block + b"\n"
    return out


def test_arc_files_are_read(tmp_path):
    path = tmp_path / "sample.arc"
    path.write_bytes(arc_file(page_urls(["python/tutorial/appetite.html", TRANSLATED["ru"]])))
    output = extract_file(path)
    kept = rows_by_url(output.kept)
    appetite = kept[BASE_URL + "python/tutorial/appetite.html"]
    assert "If you do much work on computers" in appetite["text"]
    assert appetite["fetch_time"].isoformat() == "2024-01-02T03:04:05+00:00"
    assert kept[BASE_URL + TRANSLATED["ru"]]["lang"] == "ru"
    assert read_record_html(path, appetite["warc_offset"]) == APPETITE.read_text()


def test_trafilatura_extractor_finds_the_main_paragraph(site_warc):
    output = extract_file(site_warc, extractor="trafilatura")
    row = rows_by_url(output.kept)[BASE_URL + "python/tutorial/appetite.html"]
    assert "If you do much work on computers" in row["text"]
    assert "Quick search" not in row["text"]
    assert output.stats["extractor"] == "trafilatura"


def test_fasttext_model_given_by_path_is_used(site_output, site_warc, tmp_path):
    fasttext = pytest.importorskip("fasttext", reason="optional dependency: pip install 'gristmill[fasttext]'")
    texts = {row["url"]: row["text"] for row in site_output.kept.to_pylist()}
    lines = []
    for label, rel in (("eng_Latn", "python/tutorial/venv.html"), ("fra_Latn", TRANSLATED["fr"])):
        lines += [f"__label__{label} {line}" for line in texts[BASE_URL + rel].splitlines() if len(line.split()) > 3]
    training = tmp_path / "langid.txt"
    training.write_text("\n".join(lines * 5) + "\n")
    model = fasttext.train_supervised(str(training), epoch=25, lr=1.0, dim=16, minn=2, maxn=4, verbose=0)
    model_path = tmp_path / "tiny-lid.bin"
    model.save_model(str(model_path))
    output = extract_file(site_warc, langid_model=str(model_path))
    kept = rows_by_url(output.kept)
    assert kept[BASE_URL + TRANSLATED["fr"]]["lang"] == "fra_Latn"
    assert kept[BASE_URL + "python/tutorial/venv.html"]["lang"] == "eng_Latn"
    assert 0.5 < kept[BASE_URL + TRANSLATED["fr"]]["lang_score"] <= 1.0
    assert output.stats["langid_model"] == "fasttext:tiny-lid.bin"


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        ExtractConfig(type="extract", langid_model=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="extractor"):
        ExtractConfig(type="extract", extractor="regex")
    with pytest.raises(ValueError, match="max_payload_bytes"):
        ExtractConfig(type="extract", max_payload_bytes=0)


def write_workflow(path: Path, stages: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "dask": {"scheduler": "synchronous"}, "stages": stages}))
    return path


def test_stage_runs_in_a_workflow_with_stable_ids(site_warc, tmp_path):
    (tmp_path / "warcs").mkdir()
    (tmp_path / "warcs" / "site.warc.gz").write_bytes(site_warc.read_bytes())
    (tmp_path / "warcs" / "broken.warc").write_bytes(
        raw_record("http://127.0.0.1/png", http_block(bytes(range(256)), content_type="image/png"))
        + raw_record("http://127.0.0.1/page", http_block(b"<html><body><p>A page that survives.</p></body></html>"))
    )
    workflow = write_workflow(tmp_path / "extract-demo.yaml",
                              {"extract": {"type": "extract", "input": "warcs/*.warc*"}})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    stage_dir = run_dir / "extract"
    kept = pq.read_table(stage_dir / "kept")
    removed = pq.read_table(stage_dir / "removed")
    assert (kept.num_rows, removed.num_rows) == (9, 1)
    assert removed.column("reason")[0].as_py() == "extract:not_html (image/png)"
    stats = json.loads((stage_dir / io.STATS_FILE).read_text())
    assert stats["counts"] == {"in": 10, "kept": 9, "removed": 1, "parts": 1}  # two small files, one unit
    assert stats["files"] == 2 and stats["units"] == 1 and stats["extractor"] == "resiliparse"
    assert stats["removed_by_reason"] == {"extract:not_html": 1}
    assert stats["languages"]["en"] == 4 and stats["text_chars"]["edges"][0] == 0
    rerun = run_workflow(workflow, runs_dir=tmp_path / "runs", force=True)
    assert pq.read_table(rerun / "extract" / "kept").column("id").to_pylist() == kept.column("id").to_pylist()


def test_input_that_is_not_an_archive_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a WARC")
    workflow = write_workflow(tmp_path / "bad-input.yaml", {"extract": {"type": "extract", "input": "notes.txt"}})
    with pytest.raises(Exception, match=r"notes\.txt is not a WARC, WET or ARC file"):
        run_workflow(workflow, runs_dir=tmp_path / "runs")


def test_bundled_language_model_scores_exactly_as_py3langid(site_output):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from gristmill.pipeline.extract.langid import language_identifier

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identify = language_identifier(None)
    texts = [text[:limit] for text in site_output.kept.column("text").to_pylist() for limit in (40, 1000, 10_000)]
    texts += ["", "?", "ПРИВЕТ МИР", "日本語のテキスト", "Ceci est une phrase."]
    guesses = identify(texts)
    assert len(guesses) == len(texts)
    for text, (lang, score) in zip(texts, guesses):
        expected_lang, expected_score = reference.classify(text)
        assert lang == language_code(expected_lang) and score == pytest.approx(expected_score, abs=1e-5), text[:40]


def test_language_guess_of_a_text_does_not_depend_on_the_batch(site_output, monkeypatch):
    from gristmill.pipeline.extract.langid import ByteNgramNaiveBayes, language_identifier

    identify = language_identifier(None)
    pages = site_output.kept.column("text").to_pylist()
    # Texts that end and start inside n-grams, empty ones, control bytes, and several batches.
    texts = [page[:limit] for page in pages for limit in (1, 3, 1000)] + ["", "\x00ab", "ab\x00", "  "]
    alone = [identify([text])[0] for text in texts]
    assert identify(texts) == alone
    monkeypatch.setattr(ByteNgramNaiveBayes, "BATCH_BYTES", 2_000)
    assert identify(texts * 3) == alone * 3


def test_file_that_is_not_warc_inside_is_one_unreadable_row(tmp_path):
    path = tmp_path / "mislabelled.warc.gz"
    path.write_bytes(gzip.compress(APPETITE.read_bytes()))
    output = extract_file(path)
    assert output.kept.num_rows == 0
    assert output.removed.column("reason").to_pylist() == [
        "extract:unreadable (file unreadable after byte 0: Invalid WARC header)"
    ]


def test_reads_what_the_crawl_stage_wrote(tmp_path):
    """crawl (a loopback server over the sample site's Python pages) -> extract, through the runner."""
    workflow = write_workflow(tmp_path / "crawl-extract.yaml", {
        "crawl": {"type": "crawl", "serve_directory": str(SITE / "python"), "seeds": ["tutorial/index.html"],
                  "max_pages": 6, "max_depth": 1, "delay_s": 0.0, "include": ["/tutorial/"]},
        "extract": {"type": "extract", "input": "crawl"},
    })
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    warcs = sorted((run_dir / "crawl" / "warc").glob("*.warc.gz"))
    kept = pq.read_table(run_dir / "extract" / "kept").to_pylist()
    assert warcs and len(kept) >= 2
    assert {row["warc_file"] for row in kept} <= {str(p.resolve()) for p in warcs}
    pages = {row["url"].rsplit("/", 1)[-1]: row for row in kept}
    assert "The Python Tutorial" in pages["index.html"]["title"]
    for name, row in pages.items():
        assert row["text"] and row["lang"] == "en" and row["http_status"] == 200
        assert read_record_html(row["warc_file"], row["warc_offset"]) == (SITE / "python" / "tutorial" / name).read_text()
    stats = json.loads((run_dir / "extract" / io.STATS_FILE).read_text())
    assert stats["records_by_type"]["request"] == stats["records_by_type"]["response"] == len(kept)


def test_bundled_language_model_labels_are_iso_639_1_where_one_exists_else_639_3():
    import pycountry

    from gristmill.pipeline.extract.langid import language_identifier

    labels = set(language_identifier(None).__self__.labels)
    assert len(labels) == 140 and {"yue", "wuu", "ary", "arz", "ki", "en", "zxx"} <= labels and "kik" not in labels
    for label in labels - {"zxx"}:  # zxx: no linguistic content
        language = pycountry.languages.get(alpha_2=label) if len(label) == 2 else pycountry.languages.get(alpha_3=label)
        assert language is not None, label
        assert len(label) == 2 or not hasattr(language, "alpha_2"), f"{label} has a two-letter code"


def test_normalize_text_drops_layout_debris_and_keeps_paragraphs():
    raw = "Title\t\n\t\n \n\n\nFirst paragraph.\nSecond line.\n\n-\nitem one\n- \nitem two\n*\n\n\n    indented code\n\t\n"
    assert normalize_text(raw) == (
        "Title\n\nFirst paragraph.\nSecond line.\n\n- item one\n- item two\n\n    indented code")


def test_trafilatura_and_resiliparse_keep_about_the_same_bundled_pages():
    """Both extractors' text through the default filters: trafilatura's layout debris (tab-only
    lines, bare `- ` lines) no longer makes good pages look repetitive."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    paths = sorted(SITE.rglob("*.html"))[::2]
    kept: dict[str, set[str]] = {}
    for extractor in ("resiliparse", "trafilatura"):
        texts = []
        for path in paths:
            data = path.read_bytes()
            texts.append(html_to_text(bytes_to_str(data, detect_encoding(data)), extractor)[0])
        assert not any(line.strip() in ("", "-", "*") for text in texts for line in text.split("\n\n") if text)
        table = pa.table({
            "id": [p.relative_to(SITE).as_posix() for p in paths], "url": [f"https://docs.example/{i}" for i in range(len(paths))],
            "text": texts, "lang": ["en"] * len(paths), "lang_score": pa.array([None] * len(paths), type=pa.float64()),
        })
        output = filter_documents(table, FilterConfig(type="filter", language={"enabled": False}))
        reasons = output.removed.column("reason").to_pylist()
        assert not [r for r in reasons if r.startswith("gopher_repetition:dup_line")], extractor
        kept[extractor] = set(output.kept.column("id").to_pylist())
    both, either = kept["resiliparse"] & kept["trafilatura"], kept["resiliparse"] | kept["trafilatura"]
    assert len(kept["trafilatura"]) >= 30
    assert len(both) >= 0.8 * len(either), (len(both), len(either))


def test_html_to_text_on_a_worker_thread_leaves_no_resiliparse_tree_behind():
    """A resiliparse tree freed on another thread than its own raises ("unsendable"); the trees
    html_to_text builds must all be gone when it returns, cycles or not."""
    import gc
    import sys
    import threading

    pages = [path.read_text(errors="replace") for path in sorted(SITE.rglob("*.html"))[:20]]
    unraisable = []
    gc.disable()
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        worker = threading.Thread(target=lambda: [html_to_text(p, e) for p in pages for e in ("trafilatura", "resiliparse")])
        worker.start()
        worker.join()
        assert [o for o in gc.get_objects() if type(o).__name__ == "HTMLTree"] == []
        gc.collect()
    finally:
        sys.unraisablehook = hook
        gc.enable()
    assert unraisable == []


def test_text_over_max_doc_chars_becomes_a_removed_row(site_output, site_warc):
    lengths = {row["url"]: len(row["text"]) for row in site_output.kept.to_pylist()}
    limit = sorted(lengths.values())[4]
    output = extract_file(site_warc, max_doc_chars=limit)
    assert sorted(output.kept.column("url").to_pylist()) == sorted(u for u, n in lengths.items() if n <= limit)
    removed = {row["url"]: row for row in output.removed.to_pylist()}
    assert set(removed) == {u for u, n in lengths.items() if n > limit}
    for url, row in removed.items():
        assert row["reason"] == f"extract:too_long ({lengths[url]:,} characters > max_doc_chars {limit:,})"
        assert row["text"] is None
