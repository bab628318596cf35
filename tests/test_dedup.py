"""The dedup stage: exact and edited copies go, unrelated pages stay, survivors are stable, and an
earlier run's index catches what a new batch repeats."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasketch import MinHash
from datasketch.lsh import _optimal_param
from resiliparse.extract.html2text import extract_plain_text

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.dedup import minhash as mh
from gristmill.pipeline.dedup.components import label_components, write_edges
from gristmill.pipeline.runner import StageError, run_workflow

PAGES = sorted((DATA_DIR / "sample_site").rglob("*.html"))


def page_texts() -> list[str]:
    """Plain text of the sample site's longer pages, pairwise unrelated (true Jaccard < 0.3)."""
    texts = []
    for page in PAGES:
        text = extract_plain_text(page.read_text(errors="replace"))
        if len(text.split()) >= 250:
            texts.append(text)
    shingles = [_shingle_set(t) for t in texts]
    chosen: list[int] = []
    for i, s in enumerate(shingles):
        if all(set_jaccard(s, shingles[j]) < 0.3 for j in chosen):
            chosen.append(i)
    return [texts[i] for i in chosen]


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity by Python set arithmetic: the reference for the vectorised versions."""
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


def _shingle_set(text: str) -> np.ndarray:
    hashes, _ = mh.shingle_hashes(mh.normalise_texts(pa.array([text]), mh.Normalisation()), "word", 5)
    return hashes


def edited_copy(text: str, rate: float, seed: int) -> str:
    """`text` with `rate` of its words replaced by a made-up word."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), int(len(words) * rate)):
        words[i] = f"edit{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    found = page_texts()
    assert len(found) >= 30, "the sample site should give at least 30 unrelated long pages"
    return found[:30]


def corpus(texts: list[str]) -> tuple[list[dict], dict[str, str]]:
    """Documents (`base-*` originals first by id) and the expected survivor of every copy.

    Per original i: i % 3 == 0 gets an exact copy (case and punctuation changed), i % 3 == 1 an
    edited copy (1% of words replaced, true Jaccard about 0.9) and i % 3 == 2 nothing.
    """
    docs, expected = [], {}
    for i, text in enumerate(texts):
        base = f"base-{i:03d}"
        docs.append({"id": base, "url": f"https://docs.example/{i}", "text": text})
        if i % 3 == 0:
            copy = f"copy-{i:03d}"
            docs.append({"id": copy, "url": f"https://mirror.example/{i}", "text": text.upper() + " !!"})
            expected[copy] = base
        elif i % 3 == 1:
            copy = f"edit-{i:03d}"
            docs.append({"id": copy, "url": f"https://mirror.example/{i}", "text": edited_copy(text, 0.01, i)})
            expected[copy] = base
    return docs, expected


def write_parts(docs: list[dict], folder: Path, n_parts: int, seed: int = 0) -> Path:
    """Shuffle the documents (copies land in other parts than their originals) into `n_parts` files."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(n_parts):
        rows = [docs[i] for i in order[p::n_parts]]
        table = pa.Table.from_pylist(
            [{**r, "source": "test", "fetch_time": None, "lang": "en", "lang_score": 1.0} for r in rows],
            schema=io.DOCUMENT_SCHEMA,
        )
        pq.write_table(table, folder / f"docs-{p:02d}.parquet")
    return folder


def dedup_workflow(path: Path, inputs: Path, dask: dict | None = None, **settings) -> Path:
    doc = {
        "name": path.stem,
        "dask": dask or {"scheduler": "synchronous"},
        "stages": {"dedup": {"type": "dedup", "input": str(inputs / "*.parquet"), **settings}},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def outcome(stage_dir: Path) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Kept ids, and for every removed id its (survivor, reason)."""
    kept = pa.concat_tables(pq.read_table(p) for p in io.kept_parts(stage_dir))
    removed = pa.concat_tables(pq.read_table(p) for p in io.removed_parts(stage_dir))
    return set(kept.column("id").to_pylist()), {
        r["id"]: (r["dup_survivor"], r["reason"]) for r in removed.select(["id", "dup_survivor", "reason"]).to_pylist()
    }


# ---------------------------------------------------------------------------------------------
# signatures and LSH parameters


def test_signatures_equal_datasketch_minhash_given_the_same_shingle_hashes(texts):
    normalised = mh.normalise_texts(pa.array(texts[:5] + [""]), mh.Normalisation())
    hashes, offsets = mh.shingle_hashes(normalised, "word", 5)
    signatures = mh.minhash_signatures(hashes, offsets, mh.permutations(128, seed=7))
    for i in range(6):
        reference = MinHash(num_perm=128, seed=7, hashfunc=int)
        reference.update_batch(mh.fold32(hashes[offsets[i] : offsets[i + 1]]).tolist())
        assert np.array_equal(signatures[i], reference.hashvalues)
    assert offsets[-1] - offsets[-2] == 0, "an empty text has no shingles"


def test_signatures_do_not_depend_on_how_documents_are_batched(texts):
    together = mh.signatures_of_texts(texts[:15])
    apart = np.concatenate([mh.signatures_of_texts(texts[i : i + 5]) for i in range(0, 15, 5)])
    assert np.array_equal(together, apart)


@pytest.mark.parametrize("scheme", ["one_permutation", "datasketch"])
def test_signature_estimates_track_true_jaccard_of_edited_copies(texts, scheme):
    pairs = [(t, edited_copy(t, rate, i)) for i, t in enumerate(texts[:20]) for rate in (0.01, 0.03, 0.1)]
    flat = [x for pair in pairs for x in pair]
    hashes, offsets = mh.shingle_hashes(mh.normalise_texts(pa.array(flat), mh.Normalisation()))
    signatures = mh.signatures_for(hashes, offsets, scheme, 128, seed=1)
    errors = []
    for k in range(len(pairs)):
        a, b = 2 * k, 2 * k + 1
        truth = set_jaccard(hashes[offsets[a] : offsets[a + 1]], hashes[offsets[b] : offsets[b + 1]])
        errors.append(float(mh.estimated_jaccard(signatures[a], signatures[b])) - truth)
    assert abs(np.mean(errors)) < 0.02, "no bias"
    assert np.sqrt(np.mean(np.square(errors))) < 0.06, "about the MinHash standard error at 128 slots"


def test_jaccard_of_many_pairs_at_once_equals_set_arithmetic(texts):
    docs = [texts[0], edited_copy(texts[0], 0.05, 1), texts[1], "", "", texts[1] + " " + texts[1]]
    hashes, offsets = mh.shingle_hashes(mh.normalise_texts(pa.array(docs), mh.Normalisation()))
    a, b = np.array([0, 0, 2, 3, 5, 1]), np.array([1, 2, 5, 4, 2, 1])
    expected = [set_jaccard(hashes[offsets[i] : offsets[i + 1]], hashes[offsets[j] : offsets[j + 1]]) for i, j in zip(a, b)]
    assert np.allclose(mh.jaccard_pairs(hashes, offsets, a, b), expected)
    assert expected[3] == 1.0 and 0.5 < expected[0] < 1.0 and expected[5] == 1.0


def test_short_documents_and_char_shingles():
    signatures = mh.signatures_of_texts(["two words", "two words", "Two, words!", "other"], shingle="char", ngram=5)
    assert np.array_equal(signatures[0], signatures[2])
    assert mh.estimated_jaccard(signatures[0], signatures[3]) < 0.2


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.5, 64), (0.9, 256)])
def test_bands_and_rows_match_datasketch_choice(threshold, num_perm):
    for weights in ((0.5, 0.5), (0.3, 0.7)):
        assert mh.optimal_bands_rows(threshold, num_perm, *weights) == _optimal_param(threshold, num_perm, *weights)


def test_components_rounds_label_each_component_by_its_smallest_node(tmp_path):
    chain = np.arange(100, 140)  # a path of 40 nodes: labels need many rounds to travel along it
    u = np.concatenate([[5, 7, 1, 20, -3], chain[:-1]])
    v = np.concatenate([[7, 9, 5, 21, 20], chain[1:]])
    write_edges(tmp_path, "a", u[:3], v[:3], partitions=3)
    write_edges(tmp_path, "b", u[3:], v[3:], partitions=3)
    serial = lambda fn, items, _description: [fn(item) for item in items]  # noqa: E731
    graph = label_components(tmp_path, 3, serial, "components")
    labels = pa.concat_tables(graph.labels(p) for p in range(3))
    assert dict(zip(labels.column("node").to_pylist(), labels.column("label").to_pylist())) == {
        -3: -3, 1: 1, 5: 1, 7: 1, 9: 1, 20: -3, 21: -3, **{int(n): 100 for n in chain},
    }
    assert graph.nodes == 7 + 40
    assert 20 <= graph.rounds <= 41, "min-label propagation takes about the path's length in rounds"
    assert graph.changed_per_round[-1] == 0 and sum(graph.changed_per_round) >= 39


# ---------------------------------------------------------------------------------------------
# the stage


@pytest.mark.parametrize("scheme", ["one_permutation", "datasketch"])
def test_exact_and_edited_copies_are_removed_across_partitions(texts, tmp_path, scheme):
    docs, expected = corpus(texts)
    inputs = write_parts(docs, tmp_path / "in", n_parts=4)
    run_dir = run_workflow(dedup_workflow(tmp_path / "dd.yaml", inputs, scheme=scheme), runs_dir=tmp_path / "runs")
    kept, removed = outcome(run_dir / "dedup")
    assert kept == {d["id"] for d in docs if d["id"] not in expected}
    assert {i: s for i, (s, _) in removed.items()} == expected
    assert {i: r for i, (_, r) in removed.items()} == {
        i: "dedup:exact" if i.startswith("copy") else "dedup:near" for i in expected
    }
    stats = io.read_json(run_dir / "dedup" / io.STATS_FILE)
    assert stats["counts"] == {"in": len(docs), "kept": len(kept), "removed": len(expected)}
    assert stats["lsh"]["bands"] * stats["lsh"]["rows"] <= 128
    assert stats["clusters"] == len(expected)
    assert sum(stats["cluster_size_histogram"]["counts"]) == len(expected)
    sample = stats["sample_clusters"][0]
    assert sample["documents"][0]["id"] == sample["survivor"] and sample["documents"][0]["reason"] is None
    assert all(d["head"] for d in sample["documents"])
    # survivors carry their cluster too, so the dashboard can pair them with what they replaced
    survivors = pa.concat_tables(pq.read_table(p) for p in io.kept_parts(run_dir / "dedup"))
    named = {r["id"]: r["dup_cluster"] for r in survivors.to_pylist() if r["dup_cluster"]}
    assert set(named) == set(expected.values())


def test_survivor_is_stable_across_reruns_and_partition_counts(texts, tmp_path):
    docs, _ = corpus(texts[:15])
    results = []
    for n_parts, seed in ((1, 0), (3, 1), (7, 2)):
        inputs = write_parts(docs, tmp_path / f"in{n_parts}", n_parts=n_parts, seed=seed)
        workflow = dedup_workflow(tmp_path / f"dd{n_parts}.yaml", inputs, survivor="longest", verify="signature")
        results.append(outcome(run_workflow(workflow, runs_dir=tmp_path / "runs") / "dedup"))
        if n_parts == 3:
            again = run_workflow(workflow, runs_dir=tmp_path / "runs", force=True)
            assert outcome(again / "dedup") == results[-1]
    assert results[0] == results[1] == results[2]
    length = {d["id"]: len(d["text"]) for d in docs}
    assert all(length[survivor] >= length[i] for i, (survivor, _) in results[0][1].items())
    assert any(survivor.startswith("copy") for survivor, _ in results[0][1].values()), "copies end in ' !!'"



def test_dedup_across_dask_workers_on_a_local_cluster(texts, tmp_path):
    docs, expected = corpus(texts[:18])
    inputs = write_parts(docs, tmp_path / "in", n_parts=6)
    dask = {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None, "memory_limit": "2GB"}
    run_dir = run_workflow(dedup_workflow(tmp_path / "dd.yaml", inputs, dask=dask, shuffle_partitions=3),
                           runs_dir=tmp_path / "runs")
    kept, removed = outcome(run_dir / "dedup")
    assert {i: s for i, (s, _) in removed.items()} == expected
    assert len(kept) == len(docs) - len(expected)


def test_incremental_run_removes_what_an_earlier_run_kept(texts, tmp_path):
    week1 = [{"id": f"w1-{i:03d}", "url": f"https://a.example/{i}", "text": t} for i, t in enumerate(texts[:10])]
    run1 = run_workflow(dedup_workflow(tmp_path / "week1.yaml", write_parts(week1, tmp_path / "w1", 2)),
                        runs_dir=tmp_path / "runs")
    week2 = [
        {"id": "w2-repeat", "url": "https://b.example/0", "text": texts[0] + "."},  # exact repeat of w1-000
        {"id": "w2-edited", "url": "https://b.example/1", "text": edited_copy(texts[1], 0.01, 5)},
        {"id": "w2-new", "url": "https://b.example/2", "text": texts[20]},
        {"id": "w2-new-again", "url": "https://b.example/3", "text": texts[20].lower()},
    ]
    run2 = run_workflow(
        dedup_workflow(tmp_path / "week2.yaml", write_parts(week2, tmp_path / "w2", 2), index_from=str(run1 / "dedup")),
        runs_dir=tmp_path / "runs",
    )
    kept, removed = outcome(run2 / "dedup")
    assert kept == {"w2-new"}
    assert removed == {
        "w2-repeat": ("w1-000", "dedup:seen_before"),
        "w2-edited": ("w1-001", "dedup:seen_before"),
        "w2-new-again": ("w2-new", "dedup:exact"),
    }
    # the week-2 index holds week 1 and week 2: week 3 is checked against both
    week3 = [{"id": "w3-a", "url": None, "text": texts[2]}, {"id": "w3-b", "url": None, "text": texts[20]},
             {"id": "w3-c", "url": None, "text": texts[21]}]
    run3 = run_workflow(
        dedup_workflow(tmp_path / "week3.yaml", write_parts(week3, tmp_path / "w3", 1), index_from=str(run2 / "dedup")),
        runs_dir=tmp_path / "runs",
    )
    kept, removed = outcome(run3 / "dedup")
    assert kept == {"w3-c"}
    assert removed == {"w3-a": ("w1-002", "dedup:seen_before"), "w3-b": ("w2-new", "dedup:seen_before")}
    assert io.read_json(run3 / "dedup" / "index" / "meta.json")["batches"] == 3


def test_index_with_other_settings_is_refused_by_name(texts, tmp_path):
    docs = [{"id": f"d{i}", "url": None, "text": t} for i, t in enumerate(texts[:3])]
    run1 = run_workflow(dedup_workflow(tmp_path / "a.yaml", write_parts(docs, tmp_path / "a", 1)), runs_dir=tmp_path / "runs")
    workflow = dedup_workflow(tmp_path / "b.yaml", write_parts(docs, tmp_path / "b", 1), index_from=str(run1 / "dedup"),
                              num_perm=64)
    with pytest.raises(StageError, match="num_perm"):
        run_workflow(workflow, runs_dir=tmp_path / "runs")


def test_part_without_text_column_is_a_clear_error(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a"], "url": ["u"], "body": ["no text column"]}), folder / "bad.parquet")
    with pytest.raises(StageError, match=r"bad\.parquet has no column\(s\) text"):
        run_workflow(dedup_workflow(tmp_path / "bad.yaml", folder), runs_dir=tmp_path / "runs")


def test_empty_and_null_texts_are_kept_apart_from_real_documents(texts, tmp_path):
    docs = [{"id": "a", "url": None, "text": texts[0]}, {"id": "b", "url": None, "text": ""},
            {"id": "c", "url": None, "text": None}, {"id": "d", "url": None, "text": texts[1]}]
    run_dir = run_workflow(dedup_workflow(tmp_path / "e.yaml", write_parts(docs, tmp_path / "in", 2)),
                           runs_dir=tmp_path / "runs")
    kept, removed = outcome(run_dir / "dedup")
    assert {"a", "d"} <= kept
    assert removed == {"c": ("b", "dedup:exact")}  # empty and null text normalise to the same ""


def test_same_url_is_a_duplicate_only_when_asked(texts, tmp_path):
    docs = [{"id": "a", "url": "https://docs.example/page", "text": texts[0]},
            {"id": "b", "url": "https://docs.example/page", "text": texts[1]},
            {"id": "c", "url": "https://docs.example/other", "text": texts[2]}]
    inputs = write_parts(docs, tmp_path / "in", 2)
    by_text = run_workflow(dedup_workflow(tmp_path / "text.yaml", inputs), runs_dir=tmp_path / "runs")
    assert outcome(by_text / "dedup") == ({"a", "b", "c"}, {})
    by_url = run_workflow(dedup_workflow(tmp_path / "url.yaml", inputs, url=True), runs_dir=tmp_path / "runs")
    assert outcome(by_url / "dedup") == ({"a", "c"}, {"b": ("a", "dedup:url")})
