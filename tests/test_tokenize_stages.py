"""The tokenizers and pack stages inside workflows: outputs, stats, errors, Dask."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from gristmill.pipeline.runner import StageError, run_workflow
from gristmill.pipeline.workflow import WorkflowError
from gristmill.tokenize.corpus import in_split
from gristmill.tokenize.train import load_tokenizer
from tests.test_tokenize import corpus, read_split, stream_docs  # noqa: F401 (corpus is a fixture)


def workflow_file(path: Path, corpus_parts: list[Path], dask: dict, **pack_settings) -> Path:
    stages = {
        "tokenizers": {
            "type": "tokenizers",
            "input": str(corpus_parts[0].parent / "part-*.parquet"),
            "holdout_fraction": 0.1,
            "show_progress": False,
            "tokenizers": [
                {"name": "bpe", "kind": "bpe", "vocab_size": 1200},
                {"name": "wp", "kind": "wordpiece", "vocab_size": 1200},
                {"name": "uni", "kind": "unigram", "vocab_size": 1200},
            ],
        },
        "pack": {
            "type": "pack",
            "input": [str(corpus_parts[0].parent / "part-*.parquet"), "tokenizers"],
            "tokenizer": "bpe",
            "val_fraction": 0.1,
            "shard_tokens": 50_000,
            **pack_settings,
        },
    }
    path.write_text(yaml.safe_dump({"name": path.stem, "dask": dask, "stages": stages}, sort_keys=False))
    return path


def test_workflow_trains_compares_and_packs(corpus, tmp_path):  # noqa: F811
    run_dir = run_workflow(workflow_file(tmp_path / "tok.yaml", corpus, {"scheduler": "synchronous"}),
                           runs_dir=tmp_path / "runs")
    stage = run_dir / "tokenizers"
    for name in ("bpe", "wp", "uni"):
        assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
            p.name for p in (stage / name).iterdir()}
    stats = json.loads((stage / "stats.json").read_text())
    assert [row["tokenizer"] for row in stats["table"]] == ["bpe", "wp", "uni"]
    assert stats["tokenizers"]["bpe"]["metrics"]["round_trip"] == 1.0
    assert set(stats["tokenizers"]["uni"]["metrics"]["fertility_by_lang"]) >= {"en", "de", "ja"}
    assert stats["counts"]["holdout_docs"] == stats["holdout"]["docs"] > 0
    assert "| bpe | bpe | 1200 |" in (stage / "report.md").read_text()
    held = {r["id"] for p in corpus for r in pq.read_table(p).to_pylist() if in_split([r["id"]], 0.1, 0)[0]}
    train_docs = stats["tokenizers"]["bpe"]["train_docs"]
    assert train_docs + len(held) == sum(pq.ParquetFile(p).metadata.num_rows for p in corpus)

    meta = json.loads((run_dir / "pack" / "meta.json").read_text())
    pack_stats = json.loads((run_dir / "pack" / "stats.json").read_text())
    assert pack_stats["engine"] == meta["engine"] == "tiktoken"
    assert pack_stats["counts"]["train_tokens"] == meta["tokens"]["train"] == read_split(run_dir / "pack", "train").size
    bpe = load_tokenizer(run_dir / "pack" / meta["tokenizer"])
    texts = [bpe.decode(d) for d in stream_docs(read_split(run_dir / "pack", "val"), meta["eos_id"])]
    originals = {r["text"] for p in corpus for r in pq.read_table(p).to_pylist()}
    assert len(texts) == meta["documents"]["val"] > 0 and set(texts) <= originals


def test_pack_spread_over_one_or_two_workers_writes_byte_identical_shards(corpus, tmp_path):  # noqa: F811
    runs = {}
    for name, dask, unit_docs in (("sync", {"scheduler": "synchronous"}, 8192),
                                  ("one", {"n_workers": 1, "dashboard_address": None}, 8192),
                                  ("two", {"n_workers": 2, "dashboard_address": None}, 7)):
        run_dir = run_workflow(workflow_file(tmp_path / f"{name}.yaml", corpus, dask, unit_docs=unit_docs),
                               runs_dir=tmp_path / "runs")
        runs[name] = json.loads((run_dir / "pack" / "meta.json").read_text())
        files = sorted((run_dir / "pack").glob("*_*.bin"))
        assert [s["sha256"] for s in runs[name]["shards"]] == [
            hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files, key=lambda f: (f.name[0] == "v", f.name))]
    assert runs["sync"]["shards"] == runs["one"]["shards"] == runs["two"]["shards"]
    assert len(runs["two"]["shards"]) > 2
    assert runs["one"]["encode_units"] == len(corpus) < runs["two"]["encode_units"], "small units cut the parts"


def test_bad_settings_are_errors_naming_the_key(corpus, tmp_path):  # noqa: F811
    path = workflow_file(tmp_path / "bad.yaml", corpus, {"scheduler": "synchronous"})
    with pytest.raises(WorkflowError, match=r"stage 'tokenizers', key 'tokenizers.0.vocab'"):
        run_workflow(path, runs_dir=tmp_path / "runs", overrides=["tokenizers.tokenizers=[{name: b, kind: bpe, vocab: 9}]"])
    with pytest.raises(WorkflowError, match=r"stage 'pack', key 'shard_tokens'"):
        run_workflow(path, runs_dir=tmp_path / "runs", overrides=["pack.shard_tokens=0"])
    with pytest.raises(StageError, match=r"'nope' is neither a tokenizer .* \['bpe', 'uni', 'wp'\]"):
        run_workflow(path, runs_dir=tmp_path / "runs", overrides=["pack.tokenizer=nope"])


def test_tokenizer_far_below_its_asked_vocab_size_is_warned_in_stats_and_on_the_dashboard(
        corpus, tmp_path, monkeypatch):  # noqa: F811
    stage = {"type": "tokenizers", "input": str(corpus[0].parent / "part-*.parquet"), "holdout_fraction": 0.1,
             "max_train_docs": 2, "show_progress": False,
             "tokenizers": [{"name": "huge", "kind": "bpe", "vocab_size": 100_000},
                            {"name": "fits", "kind": "bpe", "vocab_size": 300}]}
    workflow = tmp_path / "vocab.yaml"
    workflow.write_text(yaml.safe_dump({"name": "vocab", "dask": {"scheduler": "synchronous"},
                                        "stages": {"tokenizers": stage}}))
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    stats = json.loads((run_dir / "tokenizers" / "stats.json").read_text())
    trained = load_tokenizer(run_dir / "tokenizers" / "huge").get_vocab_size()
    assert trained < 50_000 and stats["tokenizers"]["huge"]["vocab_size_asked"] == 100_000
    assert len(stats["warnings"]) == 1  # `fits` got its 300
    assert "'huge'" in stats["warnings"][0] and "100000" in stats["warnings"][0] and str(trained) in stats["warnings"][0]

    from tests.test_dashboard import render

    at = render(run_dir, "tokenizers", monkeypatch)
    assert [w.value for w in at.warning] == stats["warnings"]
