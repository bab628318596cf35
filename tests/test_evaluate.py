"""The evaluate stage: bits per byte, loss and perplexity of trained models on held-out text,
checked against a direct computation with the model."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from resiliparse.extract.html2text import extract_plain_text
from rich.console import Console

from gristmill import DATA_DIR
from gristmill.model.evaluate import windows
from gristmill.model.model import ModelConfig, Transformer
from gristmill.pipeline import io
from gristmill.pipeline.runner import StageError, run_workflow
from gristmill.tokenize.recipes import train_byte_bpe

PAGES = sorted((DATA_DIR / "sample_site" / "handbook" / "en-US").glob("*.html"))[:5]
TEXT = "The handbook explains how to build packages."


def save_checkpoint(folder: Path, seq_len: int = 32, seed: int = 0) -> tuple[Path, Transformer, object, int]:
    """A small untrained decoder with a BPE tokenizer, saved as the training loop saves checkpoints."""
    tokenizer = train_byte_bpe([extract_plain_text(p.read_text()) for p in PAGES], 400)
    eos = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), seq_len=seq_len, n_layer=1, n_head=2, n_embd=32)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(), "eos_id": eos, "step": 7,
                "tokenizer_json": tokenizer.to_str()}, folder / "checkpoint.pt")
    return folder / "checkpoint.pt", model, tokenizer, eos


def evaluate(tmp_path: Path, inputs: list[str], heldout: list[str]) -> dict:
    stages = {"evaluate": {"type": "evaluate", "input": inputs, "heldout": heldout, "device": "cpu"}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"name": "eval", "dask": {"scheduler": "synchronous"}, "stages": stages}))
    run_dir = run_workflow(path, runs_dir=tmp_path / "runs", console=Console(quiet=True))
    return json.loads((run_dir / "evaluate" / io.STATS_FILE).read_text())


def test_bits_per_byte_equals_a_direct_computation_on_a_small_fixed_text(tmp_path):
    checkpoint, model, tokenizer, eos = save_checkpoint(tmp_path / "model")
    (tmp_path / "heldout.txt").write_text(TEXT)
    row, = evaluate(tmp_path, [str(checkpoint)], ["heldout.txt"])["table"]

    ids = [eos] + tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) <= 33  # one window: the direct computation is one forward pass
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    nats = F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="sum").item()
    assert row["tokens"] == len(ids) - 1 and row["bytes"] == len(TEXT.encode())
    assert row["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert row["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
    assert row["step"] == 7 and row["model"] == str(checkpoint)


def test_windows_predict_every_token_after_the_first_exactly_once():
    ids = list(range(100))
    chunks = windows(ids, 32)
    assert [len(c) for c in chunks] == [33, 33, 33, 4]
    assert [t for c in chunks for t in c[1:]] == ids[1:]
    assert windows([5], 32) == []


def test_models_are_compared_on_every_heldout_set_from_files_and_folders(tmp_path):
    first, *_ = save_checkpoint(tmp_path / "a", seed=0)
    save_checkpoint(tmp_path / "b", seed=1)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": extract_plain_text(p.read_text())}) + "\n"
                                                 for p in PAGES[:2]))
    (tmp_path / "short.txt").write_text(TEXT)
    stats = evaluate(tmp_path, [str(first), "b"], ["docs.jsonl", "short.txt"])
    rows = {(r["model"], r["heldout"]): r for r in stats["table"]}
    assert set(rows) == {(m, h) for m in (str(first), "b") for h in ("docs.jsonl", "short.txt")}
    assert rows[("b", "docs.jsonl")]["docs"] == 2 and rows[("b", "docs.jsonl")]["tokens"] > 64  # several windows
    # an untrained model is about uniform over its vocabulary: loss near ln(vocab)
    assert all(abs(r["loss"] - math.log(400)) < 0.5 for r in rows.values())


def test_an_input_without_checkpoint_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no model here")
    (tmp_path / "heldout.txt").write_text(TEXT)
    with pytest.raises(StageError, match="'empty' should name one checkpoint"):
        evaluate(tmp_path, ["empty"], ["heldout.txt"])


# ---------------------------------------------------------------------------------------------
# The ablation workflow, end to end with short settings, and its dashboard page

ABLATION = Path(__file__).resolve().parents[1] / "workflows" / "ablation.yaml"
BRANCHES = ("train_none", "train_heuristic", "train_classifier")
SHORT = ["tokenizers.tokenizers=[{name: bpe, kind: bpe, vocab_size: 600}]", "tokenizers.show_progress=false",
         "evaluate.max_docs=50"] + [
    f"{branch}.{key}" for branch in BRANCHES for key in (
        "n_layer=1", "n_head=2", "n_embd=32", "seq_len=32", "batch_size=4", "max_steps=6", "warmup_steps=1",
        "eval_every=3", "checkpoint_every=3", "log_every=1", "progress=false")]


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory) -> Path:
    """The ablation workflow in one process, with tiny models and two small held-out sets cut from
    the bundled examples (the full files take minutes to score on a loaded 2-core machine)."""
    runs = tmp_path_factory.mktemp("ablation")
    heldout = []
    for name in ("positives", "negatives"):
        lines = (DATA_DIR / "quality" / f"{name}.txt").read_text().splitlines()[:20]
        heldout.append(runs / f"{name}.jsonl")
        heldout[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    overrides = SHORT + ["dask.scheduler=synchronous", f"evaluate.heldout={json.dumps([str(p) for p in heldout])}"]
    return run_workflow(ABLATION, runs_dir=runs, overrides=overrides, console=Console(quiet=True))


def test_ablation_trains_each_branch_on_the_same_budget_and_evaluates_all_on_the_same_sets(ablation_run):
    stats = json.loads((ablation_run / "evaluate" / io.STATS_FILE).read_text())
    rows = stats["table"]
    assert [r["model"] for r in rows] == [m for m in BRANCHES for _ in range(2)]
    assert {Path(r["heldout"]).name for r in rows} == {"positives.jsonl", "negatives.jsonl"}
    assert all(r["docs"] == 20 for r in rows)
    for heldout in {r["heldout"] for r in rows}:
        same = [r for r in rows if r["heldout"] == heldout]
        assert len({r["bytes"] for r in same}) == 1 and len({r["tokens"] for r in same}) == 1  # one tokenizer
        assert all(0 < r["bits_per_byte"] < 20 for r in same)
    steps = {b: json.loads((ablation_run / b / io.DONE_FILE).read_text())["counts"] for b in BRANCHES}
    assert len({(c["steps"], c["tokens"]) for c in steps.values()}) == 1  # the same token budget
    kept = {s: json.loads((ablation_run / s / io.DONE_FILE).read_text())["counts"]["kept"]
            for s in ("extract", "filter", "classify")}
    assert kept["extract"] > kept["filter"] > kept["classify"] > 0


def test_ablations_page_shows_the_table_curves_and_branch_sizes(ablation_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GRISTMILL_RUN", str(ablation_run))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "gristmill" / "dashboards" / "app.py"),
                           default_timeout=60)
    at.query_params["page"] = "ablations"
    at.run()
    assert not at.exception and not at.error
    shown = {m.label: m.value for m in at.metric}
    assert shown["models"] == "3" and shown["held-out sets"] == "2"
    table, sizes = (d.value for d in at.dataframe)
    assert list(table["model"]) == [m for m in BRANCHES for _ in range(2)]
    assert list(sizes["model"]) == list(BRANCHES)
    assert list(sizes["documents stage"]) == ["extract", "filter", "classify"]
    classify_kept = json.loads((ablation_run / "classify" / io.DONE_FILE).read_text())["counts"]["kept"]
    assert sizes["documents"].iloc[2] == classify_kept
