"""Fine-tuning a real tiny pre-trained model: SFT masks and packing, DPO, classification, resume,
bad records, the workflow stage, `gristmill finetune` and `gristmill sample --chat`.

The base model is pre-trained here for a few dozen steps on shards of the bundled handbook pages
and the bundled fine-tuning texts (a byte-level BPE of 512 tokens trained on them).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from resiliparse.extract.html2text import extract_plain_text
from typer.testing import CliRunner

from gristmill import DATA_DIR
from gristmill.cli import app
from gristmill.model.config import TrainConfig
from gristmill.model.finetune.config import FinetuneConfig
from gristmill.model.finetune.data import (
    CHAT_TEMPLATE,
    encode_chat,
    is_held_out,
    pack,
    render_chat,
    shifted,
)
from gristmill.model.finetune.loop import finetune
from gristmill.model.finetune.objectives import dpo_loss, sequence_logps
from gristmill.model.loop import train
from gristmill.model.sample import load_checkpoint, load_model
from gristmill.pipeline.runner import run_workflow
from tests.model_fixtures import write_shards
from tests.test_model_train import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
BUNDLED = DATA_DIR / "finetune"
PAGES = sorted((DATA_DIR / "sample_site" / "handbook" / "en-US").glob("*.html"))
QUICK = dict(progress=False, log_every=1, warmup_steps=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are bound by per-op overhead; module scope so the base model trains this way too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (BUNDLED / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny decoder pre-trained for 40 steps on handbook pages and the bundled fine-tuning texts."""
    texts = [extract_plain_text(p.read_text(errors="replace")) for p in PAGES]
    texts += [render_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                          "")[0] for r in records("dpo")]
    texts += [r["text"] for r in records("classify")]
    shards = write_shards(tmp_path_factory.mktemp("shards"), texts, vocab_size=512)
    out = tmp_path_factory.mktemp("base")
    config = TrainConfig(n_layer=2, n_head=4, n_embd=64, seq_len=128, batch_size=8, max_steps=40, warmup_steps=5,
                         progress=False, eval_every=40)
    train(config, shards, out)
    return out


def run(tmp_path: Path, base: Path, method: str, data: Path, **settings) -> tuple[dict, list[dict]]:
    out = tmp_path / method
    summary = finetune(FinetuneConfig(method=method, **QUICK | settings), base, [data], out)
    return summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_mask_covers_exactly_the_assistant_tokens(base):
    _, tokenizer, _ = load_model(base)
    eos = "<|endoftext|>"
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is Debian?"},
        {"role": "assistant", "content": "A free operating system."},
        {"role": "user", "content": "And Kali?"},
        {"role": "assistant", "content": "A derivative for security work."},
    ]
    ids, mask = encode_chat(tokenizer, messages, eos)
    assert tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False) == (
        "A free operating system." + eos + "A derivative for security work." + eos
    )
    assert tokenizer.decode(ids[~mask].tolist(), skip_special_tokens=False) == (
        "<|system|>\nAnswer briefly.\n<|user|>\nWhat is Debian?\n<|assistant|>\n\n<|user|>\nAnd Kali?\n<|assistant|>\n\n"
    )
    x, y = shifted(ids, mask)
    assert np.array_equal(y[y != -1], ids[1:][mask[1:]]) and len(x) == len(ids) - 1


def test_packed_examples_do_not_attend_across_boundaries(base):
    model, _, _ = load_model(base)
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, 512, n), np.zeros(n, dtype=np.int64)) for n in (30, 45, 20)]
    rows = pack(examples, 128, pad_id=0, packed=True)
    assert len(rows) == 1 and rows.document_ids[0, :95].tolist() == [0] * 30 + [1] * 45 + [2] * 20
    x = torch.from_numpy(rows.x)
    packed_logits, _ = model(x, torch.zeros_like(x), document_ids=torch.from_numpy(rows.document_ids))
    alone, _ = model(torch.from_numpy(examples[1][0])[None], torch.zeros(1, 45, dtype=torch.long))
    torch.testing.assert_close(packed_logits[0, 30:75], alone[0], atol=1e-5, rtol=1e-4)
    leaking, _ = model(x, torch.zeros_like(x))  # without document ids the second example sees the first
    assert not torch.allclose(leaking[0, 30:75], alone[0], atol=1e-3)


def test_dpo_loss_equals_a_hand_computed_value():
    policy_chosen, policy_rejected = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0, -8.5]), torch.tensor([-11.0, -7.5])
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    # pair 1: 0.5 * ((-10 + 11) - (-12 + 11)) = 1.0; pair 2: 0.5 * ((-8 + 8.5) - (-7 + 7.5)) = 0.0
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["reward_accuracy"].item() == 0.5  # pair 2's rewards tie: not counted as right
    assert metrics["reward_margin"].item() == pytest.approx(0.5)
    assert metrics["logp_margin"].item() == pytest.approx((2.0 - 1.0) / 2)


def test_reply_log_likelihood_sums_the_reply_tokens_log_probabilities(base):
    model, _, _ = load_model(base)
    x = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    y[:, :8] = -1  # the prompt
    y[2, 15:] = -1  # padding
    logits, _ = model(x, y.clamp(min=0))
    full = logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    expected = (full * (y != -1)).sum(-1)
    torch.testing.assert_close(sequence_logps(model, model, x, y), expected, atol=1e-4, rtol=1e-5)


def test_dpo_raises_held_out_reward_accuracy_above_half(tmp_path, base):
    summary, metrics = run(tmp_path, base, "dpo", BUNDLED / "dpo.jsonl", max_steps=30, learning_rate=1e-3,
                           eval_every=30, holdout_fraction=0.2)
    removed = json.loads((tmp_path / "dpo" / "removed.json").read_text())["reasons"]
    assert summary["holdout_examples"] > 50 and set(removed) <= {"longer than the model's seq_len (128 tokens)"}
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert summary["val_reward_accuracy"] > 0.5, summary
    assert {"val_reward_margin", "val_logp_margin", "reward_accuracy"} <= set(metrics[-1])


def test_classify_beats_the_majority_class_on_its_held_out_split(tmp_path, base):
    summary, metrics = run(tmp_path, base, "classify", BUNDLED / "classify.jsonl", max_steps=40,
                           learning_rate=2e-3, eval_every=40, holdout_fraction=0.25)
    confusion = np.array(summary["val_confusion"])
    assert confusion.sum() == summary["holdout_examples"] - json.loads((tmp_path / "classify" / "removed.json")
                                                                        .read_text())["removed"]
    assert summary["val_accuracy"] > summary["val_majority_accuracy"] + 0.1, summary
    assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["val_accuracy"])
    state = load_checkpoint(tmp_path / "classify")
    assert state["labels"] == sorted({r["label"] for r in records("classify")}) and state["classifier"] is not None


@pytest.mark.parametrize("method", ["sft", "dpo", "classify"])
def test_stopped_and_resumed_finetune_matches_an_uninterrupted_run_exactly(tmp_path, base, method):
    data = tmp_path / f"{method}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(method)[:80]))
    settings = FinetuneConfig(method=method, max_steps=6, batch_size=4, eval_every=3, checkpoint_every=3, **QUICK)
    finetune(settings, base, [data], tmp_path / "straight")
    finetune(settings.model_copy(update={"stop_at": 3}), base, [data], tmp_path / "resumed")
    finetune(settings, base, [data], tmp_path / "resumed", resume=True)

    def losses(out):
        return [(r["step"], r["loss"], r.get("val_loss"), r.get("val_accuracy"))
                for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [s for s, *_ in losses(tmp_path / "straight")] == [1, 2, 3, 4, 5, 6]


def test_classify_on_two_ddp_processes_matches_one_process_with_the_same_global_batch(tmp_path, base):
    """Each process takes its half of every global batch; a per-text mean loss averaged over two
    processes is the mean over the whole batch, so the two runs agree step for step."""
    data = tmp_path / "classify.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records("classify")[::3]))
    common = ["--method", "classify", "--max-steps", "4", "--set", "warmup_steps=1", "--set", "log_every=1",
              "--set", "progress=false", "--set", "device=cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    two = subprocess.run([*torchrun, "-m", "gristmill.model.finetune.cli", str(base), str(data), "--out",
                          str(tmp_path / "ddp"), "--set", "batch_size=4", *common],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    finetune(FinetuneConfig(method="classify", max_steps=4, warmup_steps=1, log_every=1, progress=False, batch_size=8),
             base, [data], tmp_path / "single")

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [s for s, _ in ddp] == [s for s, _ in single] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in ddp], [v for _, v in single], rtol=1e-4)


def test_bad_records_are_counted_and_kept_out(tmp_path, base):
    sft = tmp_path / "sft.jsonl"
    good = [r for r in records("sft") if len(json.dumps(r)) < 250][:20]
    bad = [
        {"messages": [{"role": "user", "content": "Hello?"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"instruction": "Say something."},
        {"instruction": "Repeat.", "output": "word " * 400},
    ]
    sft.write_text("".join(json.dumps(r) + "\n" for r in good + bad) + "{not json\n[1, 2]\n")
    summary, _ = run(tmp_path, base, "sft", sft, max_steps=3)
    removed = json.loads((tmp_path / "sft" / "removed.json").read_text())
    assert summary["removed"] == removed["removed"] == 6
    assert removed["reasons"]["messages have no assistant turn"] == 1
    assert removed["examples"]["messages have no assistant turn"] == [f"{sft}:21"]
    assert removed["reasons"]["longer than the model's seq_len (128 tokens)"] == 1
    assert removed["reasons"]["'output' missing or not a string"] == 1
    assert sum(1 for r in removed["reasons"] if r.startswith("not JSON")) == 1

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records("dpo")[:10] + [{"prompt": "p", "chosen": "a",
                                                                                   "rejected": "a"}]))
    run(tmp_path, base, "dpo", pairs, max_steps=3, holdout_fraction=0.0)
    assert json.loads((tmp_path / "dpo" / "removed.json").read_text())["reasons"] == {
        "chosen and rejected are identical": 1}

    labelled = tmp_path / "labels.jsonl"
    rows = [{"text": f"Texte numero {i} en francais.", "label": "fr"} for i in range(30)]
    rows += [{"text": f"Text number {i} in English.", "label": "en"} for i in range(30)]
    rows += [{"text": f"Testo numero {i} in italiano.", "label": "it"} for i in range(30)]
    # a held-out record whose label training never saw
    unseen = next(r for i in range(1000) if is_held_out(r := {"text": f"Texto {i}.", "label": "es"}, 0.3))
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows + [unseen]))
    summary, _ = run(tmp_path, base, "classify", labelled, max_steps=3, holdout_fraction=0.3)
    assert json.loads((tmp_path / "classify" / "removed.json").read_text())["reasons"] == {
        "label 'es' not among the training labels": 1}


def test_classify_reads_parquet_records_with_another_label_column(tmp_path, base):
    table = pa.Table.from_pylist([{"text": r["text"], "site": r["label"]} for r in records("classify")[::2]])
    pq.write_table(table, tmp_path / "labelled.parquet")
    summary, metrics = run(tmp_path, base, "classify", tmp_path / "labelled.parquet", max_steps=3, label_key="site",
                           eval_every=3)
    assert summary["labels"] == ["handbook", "postgresql", "python"] and summary["removed"] == 0
    assert "val_confusion" in metrics[-1]


def test_settings_errors_name_the_key(base, tmp_path):
    with pytest.raises(ValueError, match="betta"):
        FinetuneConfig.model_validate({"method": "dpo", "betta": 0.2})
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig.model_validate({"method": "rlhf"})


def test_exported_model_loads_in_transformers_and_its_chat_template_reproduces_training(tmp_path, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run(tmp_path, base, "sft", BUNDLED / "sft.jsonl", max_steps=3)
    assert json.loads((tmp_path / "sft" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    result = CliRunner().invoke(app, ["export", str(tmp_path / "sft"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, tokenizer, _ = load_model(tmp_path / "sft")
    eos = hf_tokenizer.eos_token
    for record in records("sft")[:2] + [{"messages": [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hi"}]}]:
        messages = record.get("messages") or [{"role": "user", "content": record["instruction"] + "\n\n" + record["input"]},
                                              {"role": "assistant", "content": record["output"]}]
        for prompt in (False, True):
            text, _ = render_chat(messages, eos, add_generation_prompt=prompt)
            assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
        if messages[-1]["role"] == "assistant":
            ids, _ = encode_chat(tokenizer, messages, eos)
            hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert hf_ids == ids.tolist()
            x = torch.tensor([ids.tolist()])
            with torch.no_grad():
                logits, _ = ours(x, torch.zeros_like(x))
                torch.testing.assert_close(hf_model(x).logits, logits, atol=1e-4, rtol=1e-4)


def test_workflow_sft_then_dpo_sample_chat_and_the_dashboard_page(tmp_path, base, monkeypatch):
    workflow = tmp_path / "tiny.yaml"
    stages = {
        "sft": {"type": "finetune", "input": [str(base / "checkpoint.pt"), str(BUNDLED / "sft.jsonl")],
                "method": "sft", "max_steps": 20, "learning_rate": 1e-3, **QUICK},
        "dpo": {"type": "finetune", "input": ["sft", str(BUNDLED / "dpo.jsonl")], "method": "dpo", "max_steps": 4,
                **QUICK},
    }
    workflow.write_text(yaml.safe_dump({"name": "tiny", "dask": {"scheduler": "synchronous"}, "stages": stages}))
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    sft_stats = json.loads((run_dir / "sft" / "stats.json").read_text())
    dpo_stats = json.loads((run_dir / "dpo" / "stats.json").read_text())
    removed = json.loads((run_dir / "sft" / "removed.json").read_text())["reasons"]
    assert sft_stats["counts"]["steps"] == 20 and set(removed) == {"longer than the model's seq_len (128 tokens)"}
    assert sft_stats["val_loss"] > 0 and dpo_stats["counts"]["steps"] == 4 and "val_reward_accuracy" in dpo_stats
    assert load_checkpoint(run_dir / "dpo")["chat_template"] == CHAT_TEMPLATE

    result = CliRunner().invoke(app, ["sample", str(run_dir / "dpo"), "--chat", "--prompt",
                                      'What does the section "Quotas" say?', "--max-new-tokens", "30",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() and "<|user|>" not in result.output and "Quotas\" say?" not in result.output

    refused = CliRunner().invoke(app, ["sample", str(base), "--chat", "--prompt", "Hi", "--device", "cpu"])
    assert refused.exit_code != 0 and "no chat template" in refused.output

    # the dashboard's fine-tuning page shows each stage's method metrics from the run folder
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("GRISTMILL_RUN", str(run_dir))
    page = AppTest.from_file(str(REPO / "gristmill" / "dashboards" / "app.py"), default_timeout=60)
    page.query_params["page"] = "finetune"
    page.run()
    assert not page.exception, [e.value for e in page.exception]
    shown = {m.label: m.value for m in page.metric}
    assert shown["method"] == "sft" and shown["records kept out"] == str(sum(removed.values()))
    page.selectbox(key="finetune-stage").select("dpo").run()
    shown = {m.label: m.value for m in page.metric}
    last = json.loads((run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert shown["method"] == "dpo" and shown["held-out reward accuracy"] == f"{last['val_reward_accuracy']:.1%}"


def test_finetune_command_trains_and_rejects_unknown_settings(tmp_path, base):
    runner = CliRunner()
    bad = runner.invoke(app, ["finetune", str(base), str(BUNDLED / "classify.jsonl"), "--method", "classify",
                              "--out", str(tmp_path / "out"), "--set", "lables=x"])
    assert bad.exit_code == 2 and "lables" in bad.output
    good = runner.invoke(app, ["finetune", str(base), str(BUNDLED / "classify.jsonl"), "--method", "classify",
                               "--out", str(tmp_path / "out"), "--max-steps", "3", "--set", "warmup_steps=1",
                               "--set", "progress=false", "--set", "device=cpu"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.output)["steps"] == 3 and "val_confusion" in json.loads(good.output)
