"""The classify stage: a fastText quality classifier trained on the bundled examples separates
good text from boilerplate and word salad, and the stage keeps exactly what it is told to."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console

pytest.importorskip("fasttext", reason="optional dependency: pip install 'gristmill[fasttext]'")

from gristmill.pipeline import io  # noqa: E402
from gristmill.pipeline.classify.examples import (  # noqa: E402
    BUNDLED_DIR,
    NEGATIVES_FILE,
    POSITIVES_FILE,
    bundled_examples,
)
from gristmill.pipeline.classify.model import (  # noqa: E402
    FastTextSettings,
    load_classifier,
    score_texts,
    train_classifier,
)
from gristmill.pipeline.classify.stage import LOW_SCORE, MISSING_TEXT, SCORE_COLUMN, global_cut  # noqa: E402
from gristmill.pipeline.runner import StageError, run_workflow  # noqa: E402
from gristmill.pipeline.workflow import WorkflowError, load_workflow  # noqa: E402

POSITIVES = BUNDLED_DIR / POSITIVES_FILE
NEGATIVES = BUNDLED_DIR / NEGATIVES_FILE


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_bundled_examples_are_rebuilt_exactly_from_the_sample_site():
    positives, negatives = bundled_examples()
    assert positives == lines(POSITIVES) and negatives == lines(NEGATIVES)
    assert len(positives) > 500 and len(negatives) > 500


def test_classifier_separates_bundled_positives_from_negatives_on_held_out_examples(tmp_path):
    trained = train_classifier(lines(POSITIVES), lines(NEGATIVES), FastTextSettings(holdout_fraction=0.25), tmp_path)
    metrics = trained.metrics
    assert metrics["holdout_examples"] == int(0.25 * (metrics["positives"] + metrics["negatives"]))
    chance = max(metrics["positives"], metrics["negatives"]) / (metrics["positives"] + metrics["negatives"])
    assert chance < 0.61 and metrics["accuracy"] > 0.8  # measured 0.85
    assert metrics["precision"] > 0.75 and metrics["recall"] > 0.75
    assert trained.path.is_file()


def test_global_cut_keeps_exactly_the_fraction_with_ties_across_parts():
    parts = [np.array([0.9, 0.5, 0.5, np.nan], np.float32), np.array([0.5, 0.1], np.float32),
             np.array([0.5, 0.7], np.float32)]
    cut, quotas = global_cut(parts, 0.5)  # 7 scored documents -> keep round(3.5) = 4
    assert cut == pytest.approx(0.5) and quotas == [2, 0, 0]  # 0.9 and 0.7 above; 4 tie at 0.5, 2 wanted
    cut, quotas = global_cut(parts, 5 / 7)
    assert cut == pytest.approx(0.5) and quotas == [2, 1, 0]  # ties are taken in part order
    cut, quotas = global_cut(parts, 0.0)
    assert cut == float("inf") and quotas == [0, 0, 0]


def write_documents(folder: Path, n_parts: int = 3, per_part: int = 30) -> list[str]:
    """Parquet parts of real paragraphs and boilerplate taken from the bundled examples; one
    document has no text."""
    rng = random.Random(1)
    pool = rng.sample(lines(POSITIVES), n_parts * per_part // 2) + rng.sample(lines(NEGATIVES), n_parts * per_part // 2)
    rng.shuffle(pool)
    names = []
    for p in range(n_parts):
        rows = [{"id": f"d{p}-{i}", "text": text} for i, text in enumerate(pool[p * per_part:(p + 1) * per_part])]
        if p == 1:
            rows[0]["text"] = None
        name = f"docs-{p}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, pa.schema([("id", pa.string()), ("text", pa.string())])),
                       folder / name)
        names.append(name)
    return names


def run(tmp_path: Path, classify: dict, name: str = "classify") -> Path:
    stages = {"classify": {"type": "classify", "input": "docs-*.parquet", **classify}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "dask": {"scheduler": "synchronous"}, "stages": stages}))
    return run_workflow(path, runs_dir=tmp_path / "runs", console=Console(quiet=True))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classify")
    write_documents(folder)
    return run(folder, {"positives": str(POSITIVES), "negatives": str(NEGATIVES), "keep_fraction": 0.4})


def test_keep_fraction_keeps_exactly_that_fraction_of_scored_documents(trained_run):
    stats = json.loads((trained_run / "classify" / io.STATS_FILE).read_text())
    kept = pq.read_table(trained_run / "classify" / io.KEPT).to_pylist()
    removed = pq.read_table(trained_run / "classify" / io.REMOVED).to_pylist()
    assert stats["scored"] == 89 and len(kept) == round(0.4 * 89) and len(kept) + len(removed) == 90
    assert min(d[SCORE_COLUMN] for d in kept) >= max(d[SCORE_COLUMN] for d in removed if d[SCORE_COLUMN] is not None)
    assert {d["reason"] for d in removed} == {LOW_SCORE, MISSING_TEXT}
    assert [d[SCORE_COLUMN] for d in removed if d["reason"] == MISSING_TEXT] == [None]
    assert stats["model"]["accuracy"] > 0.8 and sum(stats["histogram"]["counts"]) == 89
    assert len(list((trained_run / "classify" / "scores").glob("part-*.npy"))) == 3


def test_model_trained_elsewhere_is_loaded_and_threshold_keeps_scores_above_it(trained_run, tmp_path):
    write_documents(tmp_path)
    model = trained_run / "classify" / "quality_model.bin"
    run_dir = run(tmp_path, {"model": str(model), "threshold": 0.8}, name="loaded")
    kept = pq.read_table(run_dir / "classify" / io.KEPT).column(SCORE_COLUMN).to_numpy()
    removed = pq.read_table(run_dir / "classify" / io.REMOVED).to_pylist()
    assert len(kept) > 0 and (kept >= 0.8).all()
    assert all(d[SCORE_COLUMN] is None or d[SCORE_COLUMN] < 0.8 for d in removed)
    # the same model scores the same documents the same way in both runs
    first = {d["id"]: d[SCORE_COLUMN] for d in pq.read_table(trained_run / "classify" / io.KEPT).to_pylist()}
    again = {d["id"]: d[SCORE_COLUMN] for which in (io.KEPT, io.REMOVED)
             for d in pq.read_table(run_dir / "classify" / which).to_pylist()}
    assert all(again[i] == pytest.approx(s) for i, s in first.items())


def test_a_stage_serves_as_negative_examples(tmp_path):
    write_documents(tmp_path)
    (tmp_path / "noise.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines(NEGATIVES)[:400]))
    stages = {"noise": {"type": "read", "input": "noise.jsonl"},
              "classify": {"type": "classify", "input": "docs-*.parquet", "positives": str(POSITIVES),
                           "negatives": ["noise"]}}
    path = tmp_path / "stage-negatives.yaml"
    path.write_text(yaml.safe_dump({"dask": {"scheduler": "synchronous"}, "stages": stages}))
    assert load_workflow(path).upstream("classify") == ["noise", "classify"]
    run_dir = run_workflow(path, runs_dir=tmp_path / "runs", console=Console(quiet=True))
    stats = json.loads((run_dir / "classify" / io.STATS_FILE).read_text())
    assert stats["model"]["negatives"] == 400 and stats["threshold"] == 0.5


def test_bad_settings_are_errors_naming_the_key(tmp_path):
    write_documents(tmp_path)
    with pytest.raises(WorkflowError, match="key 'keep_fractoin': unknown key"):
        run(tmp_path, {"model": "m.bin", "keep_fractoin": 0.5})
    with pytest.raises(WorkflowError, match="not both"):
        run(tmp_path, {"model": str(POSITIVES), "positives": str(POSITIVES), "negatives": str(NEGATIVES)})
    with pytest.raises(WorkflowError, match="key 'positives': 'nowhere.txt' is neither a stage"):
        run(tmp_path, {"positives": "nowhere.txt", "negatives": str(NEGATIVES)})
    with pytest.raises(StageError, match="positives.txt: not a fastText model"):
        run(tmp_path, {"model": str(POSITIVES)}, name="not-a-model")


def test_classify_page_shows_scores_threshold_and_examples(trained_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GRISTMILL_RUN", str(trained_run))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "gristmill" / "dashboards" / "app.py"),
                           default_timeout=60)
    at.query_params["page"] = "classify"
    at.run()
    assert not at.exception and not at.error
    shown = {m.label: m.value for m in at.metric}
    assert shown["documents in"] == "90" and shown["kept"] == "36"
    stats = json.loads((trained_run / "classify" / io.STATS_FILE).read_text())
    assert shown["threshold"] == f"{stats['threshold']:.3f}"
    assert [s.value for s in at.subheader] == ["Scores", "Best-scored documents", "Worst-scored documents"]
    at.slider(key="classify-threshold").set_value(0.0).run()
    assert "89 of 89 documents" in " ".join(c.value for c in at.caption)


def test_retraining_in_the_same_process_scores_with_the_new_model(tmp_path):
    write_documents(tmp_path)
    settings = {"positives": str(POSITIVES), "negatives": str(NEGATIVES), "threshold": 0.5}
    run(tmp_path, {**settings, "fasttext": {"epoch": 1, "dim": 4}})
    run_dir = run(tmp_path, {**settings, "fasttext": {"epoch": 20}})  # same stage folder, same model file name
    model = load_classifier(run_dir / "classify" / "quality_model.bin")
    table = pa.concat_tables(pq.read_table(p) for p in io.list_parts(run_dir / "classify" / io.KEPT))
    assert table.column(SCORE_COLUMN).to_numpy() == pytest.approx(score_texts(model, table.column("text").to_pylist()))
