"""The pii stage: replacement policies, spans, stats, config errors, and a run through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from resiliparse.extract.html2text import extract_plain_text

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.pii.stage import PiiConfig, restore_original, scrub_partition
from gristmill.pipeline.runner import run_workflow
from gristmill.pipeline.workflow import WorkflowError

TEXT = (
    "Contact bob@corp.io or call +49 89 12345678. Again: bob@corp.io. "
    "Backup contact alice@corp.io, server 8.8.8.8, docs at info@example.com."
)


def documents(texts: list[str | None], langs: list[str | None] | None = None) -> pa.Table:
    rows = [
        {"id": f"d{i}", "url": f"https://site.test/{i}", "text": t, "source": "fixture", "fetch_time": None,
         "lang": (langs or [None] * len(texts))[i], "lang_score": None}
        for i, t in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=io.DOCUMENT_SCHEMA)


def scrub_one(text: str, **config) -> dict:
    out = scrub_partition(documents([text]), PiiConfig(type="pii", **config))
    return out.kept.to_pylist()[0]


def test_tag_policy_replaces_each_finding_with_its_type():
    row = scrub_one(TEXT)
    assert row["text"] == (
        "Contact <EMAIL> or call <PHONE>. Again: <EMAIL>. "
        "Backup contact <EMAIL>, server <IP_ADDRESS>, docs at info@example.com."
    )
    assert row["pii_counts"]["email"] == 3 and row["pii_counts"]["phone"] == 1 and row["pii_counts"]["iban"] == 0


def test_spans_point_into_the_original_text_and_restore_it():
    row = scrub_one(TEXT)
    for span in row["pii_spans"]:
        assert TEXT[span["start"] : span["end"]] == span["original"]
    assert [s["original"] for s in row["pii_spans"]] == ["bob@corp.io", "+49 89 12345678", "bob@corp.io",
                                                         "alice@corp.io", "8.8.8.8"]
    assert restore_original(row["text"], row["pii_spans"]) == TEXT


def test_pseudonyms_are_consistent_within_a_document_and_restart_in_the_next():
    out = scrub_partition(documents([TEXT, "Only alice@corp.io here."]), PiiConfig(type="pii", policy="pseudonym"))
    first, second = out.kept.to_pylist()
    assert first["text"].startswith("Contact <EMAIL_1> or call <PHONE_1>. Again: <EMAIL_1>. Backup contact <EMAIL_2>")
    assert second["text"] == "Only <EMAIL_1> here."


def test_hash_policy_is_salted_and_stable():
    a = scrub_one(TEXT, policy="hash", hash_salt="s1")["text"]
    b = scrub_one(TEXT, policy="hash", hash_salt="s1")["text"]
    c = scrub_one(TEXT, policy="hash", hash_salt="s2")["text"]
    assert a == b and a != c
    emails = [w.strip(",.") for w in a.split() if w.startswith("<EMAIL:")]
    assert len(emails) == 3 and emails[0] == emails[1] != emails[2]


def test_annotate_leaves_text_and_per_type_policies_override():
    row = scrub_one(TEXT, policy="annotate", policies={"ip_address": "tag"})
    assert row["text"] == TEXT.replace("8.8.8.8", "<IP_ADDRESS>")
    assert len(row["pii_spans"]) == 5


def test_originals_can_be_left_out_of_spans_and_examples():
    out = scrub_partition(documents([TEXT]), PiiConfig(type="pii", store_originals=False))
    spans = out.kept.column("pii_spans").to_pylist()[0]
    assert all(s["original"] is None for s in spans) and len(spans) == 5
    assert out.stats["examples"] and all("before" not in e for e in out.stats["examples"])
    assert "bob@corp.io" not in json.dumps(out.stats)
    with pytest.raises(ValueError, match="without originals"):
        restore_original(out.kept.column("text")[0].as_py(), spans)


def test_allow_lists_come_from_the_config():
    row = scrub_one(TEXT, allow_email_domains=["corp.io"], allow_values=["8.8.8.8"])
    assert row["text"] == TEXT.replace("+49 89 12345678", "<PHONE>").replace("info@example.com", "<EMAIL>")


def test_document_language_decides_how_national_phone_numbers_are_read():
    text = "Rufen Sie 030 1234567 an."
    out = scrub_partition(documents([text, text], ["de", "en"]), PiiConfig(type="pii"))
    assert out.kept.column("text").to_pylist() == ["Rufen Sie <PHONE> an.", text]


def test_null_text_is_removed_with_a_reason_and_nothing_is_lost():
    table = documents([TEXT, None, "clean text"])
    out = scrub_partition(table, PiiConfig(type="pii"))
    assert out.kept.num_rows + out.removed.num_rows == table.num_rows
    assert out.removed.column("id").to_pylist() == ["d1"]
    assert out.removed.column("reason").to_pylist() == ["pii:null_text"]
    assert out.stats["documents"] == 2 and out.stats["documents_with_pii"] == 1
    assert out.stats["found"]["email"] == 3 and out.stats["documents_by_type"]["email"] == 1
    assert out.kept.column_names == [*io.DOCUMENT_SCHEMA.names, "pii_counts", "pii_spans"]


def test_spans_counts_and_examples_line_up_with_their_documents():
    """Spans and counts of each kept row belong to that row, past null and clean documents; every
    example shows the replacement at the place of its original."""
    texts = ["clean text", TEXT, None, "Only alice@corp.io here.", "", "Card 4111 1111 1111 1111 and 8.8.8.8"]
    config = PiiConfig(type="pii", policy="pseudonym", examples_per_type=5, example_window=6)
    out = scrub_partition(documents(texts), config)
    rows = out.kept.to_pylist()
    originals = [t for t in texts if t is not None]
    assert [len(r["pii_spans"]) for r in rows] == [0, 5, 1, 0, 2]
    for row, original in zip(rows, originals):
        assert restore_original(row["text"], row["pii_spans"]) == original
        types = [s["type"] for s in row["pii_spans"]]
        assert {t: n for t, n in row["pii_counts"].items() if n} == {t: types.count(t) for t in types}
        assert all(original[s["start"] : s["end"]] == s["original"] for s in row["pii_spans"])
    assert rows[4]["pii_spans"] == [
        {"type": "payment_card", "start": 5, "end": 24, "replacement": "<PAYMENT_CARD_1>",
         "original": "4111 1111 1111 1111"},
        {"type": "ip_address", "start": 29, "end": 36, "replacement": "<IP_ADDRESS_1>", "original": "8.8.8.8"},
    ]
    assert out.stats["found"]["email"] == 4 and out.stats["documents_by_type"]["email"] == 2
    assert out.stats["examples"][-2:] == [
        {"id": "d5", "type": "payment_card", "after": "Card <PAYMENT_CARD_1> and <",
         "before": "Card 4111 1111 1111 1111 and 8"},
        {"id": "d5", "type": "ip_address", "after": "> and <IP_ADDRESS_1>", "before": "1 and 8.8.8.8"},
    ]
    assert [(e["id"], e["type"]) for e in out.stats["examples"][:6]] == [
        ("d1", "email"), ("d1", "phone"), ("d1", "email"), ("d1", "email"), ("d1", "ip_address"), ("d3", "email")
    ]


def test_missing_text_column_is_a_clear_error():
    with pytest.raises(ValueError, match="no `text` column"):
        scrub_partition(pa.table({"id": ["a"], "body": ["x"]}), PiiConfig(type="pii"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"types": ["email", "phones"]}, "unknown PII types \\['phones'\\]"),
        ({"policy": "hash"}, "needs `hash_salt`"),
        ({"policies": {"emial": "tag"}}, "unknown PII types \\['emial'\\]"),
        ({"phone_region": "XX"}, "not a region"),
        ({"allow_networks": ["10.0.0.0/33"]}, "allow-list network"),
        ({"types": ["person"]}, "presidio-analyzer"),
        ({"polciy": "tag"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_the_key(settings, message):
    with pytest.raises(ValidationError, match=message):
        PiiConfig(type="pii", **settings)


# ---------------------------------------------------------------------------------------------- runner


def sample_texts(n: int) -> list[str]:
    pages = sorted((DATA_DIR / "sample_site" / "handbook").rglob("*.html"))[:n]
    return [extract_plain_text(p.read_text(errors="replace"), main_content=True) for p in pages]


def test_pii_stage_runs_through_the_runner_on_parquet(tmp_path: Path):
    texts = sample_texts(6)
    texts[1] = texts[1] + "\nMaintainer: Jane Roe <jane.roe@corp.io>, +44 20 7946 0958."
    texts[3] = None
    inputs = tmp_path / "docs"
    io.write_parquet_atomic(documents(texts[:3]), inputs / "a.parquet")
    io.write_parquet_atomic(documents(texts[3:]), inputs / "b.parquet")
    workflow = tmp_path / "scrub.yaml"
    workflow.write_text(yaml.safe_dump({
        "name": "scrub",
        "dask": {"scheduler": "synchronous"},
        "stages": {"pii": {"type": "pii", "input": str(inputs / "*.parquet"), "policy": "pseudonym"}},
    }))
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    stage = run_dir / "pii"
    kept = pq.read_table(io.kept_parts(stage))
    removed = pq.read_table(io.removed_parts(stage))
    assert kept.num_rows == 5 and removed.column("reason").to_pylist() == ["pii:null_text"]
    assert any("Maintainer: Jane Roe <<EMAIL_1>>, <PHONE_1>." in t for t in kept.column("text").to_pylist())
    stats = json.loads((stage / "stats.json").read_text())
    done = json.loads((stage / "_DONE.json").read_text())
    assert done["counts"]["in"] == 6 and done["counts"]["removed"] == 1
    assert stats["documents"] == 5 and stats["removed_by_reason"] == {"pii:null_text": 1}
    assert stats["found"]["email"] >= 1 and stats["found"]["phone"] >= 1
    assert stats["policies"]["email"] == "pseudonym"
    assert any(e["type"] == "email" and "jane.roe@corp.io" in e["before"] and "<EMAIL_1>" in e["after"]
               for e in stats["examples"])


def test_workflow_with_a_bad_pii_key_fails_before_running(tmp_path: Path):
    workflow = tmp_path / "bad.yaml"
    workflow.write_text(yaml.safe_dump({
        "name": "bad",
        "dask": {"scheduler": "synchronous"},
        "stages": {"pii": {"type": "pii", "input": "x/*.parquet", "policy": "hash"}},
    }))
    with pytest.raises(WorkflowError, match="stage 'pii'.*hash_salt"):
        run_workflow(workflow, runs_dir=tmp_path / "runs")
