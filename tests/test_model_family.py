"""Encoder (MLM) and encoder-decoder (span corruption, prefix-LM) beside the decoder: masks hold,
objectives build the batches they promise, each architecture trains real steps on real shards,
resumes exactly, reports its validation metric, and fills masks or generates from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from resiliparse.extract.html2text import extract_plain_text

from gristmill import DATA_DIR
from gristmill.model.config import TrainConfig
from gristmill.model.data import TrainLoader, read_shards_info
from gristmill.model.loop import train
from gristmill.model.model import ModelConfig, Transformer
from gristmill.model.objectives import Objective, span_counts
from gristmill.model.sample import load_checkpoint, load_model, sample_text
from gristmill.tokenize.corpus import Sample
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import load_tokenizer, save_tokenizer, train_tokenizer
from tests.test_model_train import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
TINY = dict(n_layer=2, n_head=4, n_embd=64, seq_len=64, batch_size=8, progress=False, log_every=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**dict(vocab_size=VOCAB, seq_len=64, n_layer=2, n_head=4, n_embd=64) | overrides)).eval()


def random_ids(batch: int = 1, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def changed_at(ids: torch.Tensor, position: int) -> torch.Tensor:
    out = ids.clone()
    out[:, position] = (out[:, position] + 1) % VOCAB
    return out




@pytest.mark.parametrize("position", ["rope", "alibi", "learned", "relative"])
def test_encoder_positions_see_tokens_on_both_sides(position):
    model = tiny(architecture="encoder", position=position)
    ids = random_ids()
    with torch.no_grad():
        base, _ = model(ids)
        later, _ = model(changed_at(ids, 20))
        earlier, _ = model(changed_at(ids, 3))
    assert not torch.allclose(base[:, :20], later[:, :20])  # earlier positions see a later token
    assert not torch.allclose(base[:, 4:], earlier[:, 4:])  # and later ones an earlier token


def test_encoder_sliding_window_hides_tokens_farther_than_the_window_on_both_sides():
    model = tiny(architecture="encoder", n_layer=1, sliding_window=4)
    ids = random_ids(length=24)
    with torch.no_grad():
        base, _ = model(ids)
        changed, _ = model(changed_at(ids, 12))
    differs = ~torch.isclose(base[0], changed[0]).all(-1)
    assert differs.nonzero().flatten().tolist() == list(range(9, 16))  # |q - 12| < 4


@pytest.mark.parametrize("position", ["rope", "relative", "learned"])
def test_encoder_decoder_decoder_is_causal_and_cross_attends_every_encoder_position(position):
    model = tiny(architecture="encoder_decoder", position=position)
    source, target = random_ids(length=20, seed=2), random_ids(length=12, seed=3)
    with torch.no_grad():
        base, _ = model(source, target.clone().fill_(-1), decoder_idx=target)
        future, _ = model(source, target.clone().fill_(-1), decoder_idx=changed_at(target, 8))
    torch.testing.assert_close(base[:, :8], future[:, :8], rtol=0, atol=0)  # no decoder position sees its future
    assert not torch.allclose(base[:, 8:], future[:, 8:])
    memory = model.encode(source).detach().requires_grad_()
    logits, _ = model(None, decoder_idx=target[:, :1], memory=memory)  # the first decoder position
    (grad,) = torch.autograd.grad(logits.sum(), memory)
    assert (grad.abs().sum(-1) > 0).all()  # ... depends on every encoder position


def test_masked_lm_loss_never_sees_a_masked_targets_value():
    """The encoder's logits at a [MASK]ed position are the same whatever the hidden token was, and
    only the selected positions are scored."""
    model = tiny(architecture="encoder")
    tokens = np.random.default_rng(0).integers(0, VOCAB - 1, (4, 33))
    objective = Objective(name="mlm", architecture="encoder", vocab_size=VOCAB, mask_id=VOCAB - 1)
    rngs = [np.random.default_rng(i) for i in range(4)]
    batch = objective.batch(tokens, rngs, np.random.default_rng(9))
    masked = batch.x == VOCAB - 1
    assert masked.any() and (batch.y[masked] >= 0).all()
    other = tokens.copy()
    other[:, :-1][masked.numpy()] = (other[:, :-1][masked.numpy()] + 5) % (VOCAB - 1)  # different hidden values
    again = objective.batch(other, [np.random.default_rng(i) for i in range(4)], np.random.default_rng(9))
    assert torch.equal(again.x, batch.x)  # the input does not carry them
    with torch.no_grad():
        logits, _ = model(batch.x)
        logits_again, _ = model(again.x)
    torch.testing.assert_close(logits[masked], logits_again[masked], rtol=0, atol=0)
    _, loss = model(batch.x, batch.y)
    scored_logits, _ = model(batch.x, batch.y)
    assert scored_logits.shape == (int((batch.y != -1).sum()), VOCAB) and torch.isfinite(loss)


def test_mlm_selects_15_percent_and_masks_80_randomises_10_keeps_10():
    tokens = np.random.default_rng(0).integers(0, VOCAB - 1, (200, 129))
    objective = Objective(name="mlm", architecture="encoder", vocab_size=VOCAB, mask_id=VOCAB - 1)
    batch = objective.batch(tokens, [np.random.default_rng(i) for i in range(200)], np.random.default_rng(0))
    original = torch.from_numpy(tokens[:, :-1])
    selected = batch.y != -1
    assert torch.equal(batch.y[selected], original[selected]) and torch.equal(batch.x[~selected], original[~selected])
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    masked = (batch.x[selected] == VOCAB - 1).float().mean().item()
    kept = (batch.x[selected] == original[selected]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03  # the rest (~10 %) random (rarely equal by chance)


def test_span_corruption_inputs_and_targets_rebuild_the_window():
    tokens = np.arange(1000, 1065)[None, :].repeat(3, axis=0)  # 64 tokens used (the +1 is the causal target)
    sentinels = tuple(range(32))
    objective = Objective(name="span_corruption", architecture="encoder_decoder", sentinel_ids=sentinels, decoder_start_id=99)
    batch = objective.batch(tokens, [np.random.default_rng(i) for i in range(3)], np.random.default_rng(0))
    n_noise, n_spans = span_counts(64, 0.15, 3.0)
    assert (n_noise, n_spans) == (10, 3)
    assert batch.x.shape == (3, 64 - n_noise + n_spans) and batch.y.shape == (3, n_noise + n_spans)
    assert (batch.decoder_x[:, 0] == 99).all() and torch.equal(batch.decoder_x[:, 1:], batch.y[:, :-1])
    for row in range(3):
        inputs, targets = batch.x[row].tolist(), batch.y[row].tolist()
        spans, current = {}, None
        for token in targets:
            if token < 32:
                current = token
                spans[current] = []
            else:
                spans[current].append(token)
        rebuilt = [t for token in inputs for t in (spans[token] if token < 32 else [token])]
        assert rebuilt == list(range(1000, 1064))
        assert [t for t in inputs if t < 32] == [0, 1, 2]
    assert not torch.equal(batch.x[0], batch.x[1])  # each row its own spans


def test_encoder_decoder_prefix_lm_splits_each_step_at_one_point(shards):
    objective = Objective(name="prefix_lm", architecture="encoder_decoder", decoder_start_id=7)
    loader = TrainLoader(read_shards_info(shards).train, 64, 4, 1, seed=3, objective=objective)
    batch = loader.batch(1, 0)
    split = batch.x.size(1)
    assert batch.y.size(1) == 65 - split and (batch.decoder_x[:, 0] == 7).all()
    assert torch.equal(batch.decoder_x[:, 1:], batch.y[:, :-1])


ARCHITECTURES = [
    dict(architecture="encoder"),
    dict(architecture="encoder", position="learned", mlp="gelu", norm="layernorm", norm_placement="post"),
    dict(architecture="encoder_decoder"),
    dict(architecture="encoder_decoder", position="relative", sliding_window=16),
    dict(architecture="encoder_decoder", objective="prefix_lm"),
]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("options", ARCHITECTURES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_each_architecture_learns_and_reports_its_validation_metric(tmp_path, shards, options):
    config = TrainConfig(**TINY | options | dict(max_steps=40, warmup_steps=5, learning_rate=3e-3, eval_every=40))
    summary = train(config, shards, tmp_path / "out")
    records = metrics(tmp_path / "out")
    last = np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.85 * records[0]["loss"], (records[0]["loss"], last)
    assert 0 < summary["val_loss"] < records[0]["loss"] and 0 < summary["val_accuracy"] <= 1
    assert records[-1]["val_accuracy"] == summary["val_accuracy"]


@pytest.mark.parametrize("architecture", ["encoder", "encoder_decoder"])
def test_stopped_and_resumed_run_matches_an_uninterrupted_run_exactly(tmp_path, shards, architecture):
    config = TrainConfig(**TINY | dict(architecture=architecture, max_steps=10, warmup_steps=2, eval_every=5))
    train(config, shards, tmp_path / "straight")
    train(config.model_copy(update={"stop_at": 4}), shards, tmp_path / "resumed")
    train(config, shards, tmp_path / "resumed", resume=True)
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]  # bit for bit
    assert (resumed[-1]["val_loss"], resumed[-1]["val_accuracy"]) == (straight[-1]["val_loss"], straight[-1]["val_accuracy"])
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_encoder_decoder_ddp_on_two_cpu_processes_matches_one_process(tmp_path, shards):
    settings = ["architecture=encoder_decoder", "warmup_steps=2", "log_every=1", "progress=false", "n_head=4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    two = subprocess.run(
        [*torchrun, "-m", "gristmill.model.train", str(shards), "--out", str(tmp_path / "ddp"), "--max-steps", "6",
         "--n-layer", "2", "--n-embd", "64", "--seq-len", "64", "--batch-size", "4",
         *[arg for setting in settings for arg in ("--set", setting)]],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    train(TrainConfig(**TINY | dict(architecture="encoder_decoder", max_steps=6, warmup_steps=2)), shards, tmp_path / "one")
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=1e-4)
    np.testing.assert_allclose(ddp[-1]["val_accuracy"], one[-1]["val_accuracy"], rtol=1e-6)


@pytest.mark.parametrize(("kind", "mask"), [("bpe", "<mask>"), ("wordpiece", "[MASK]"), ("unigram", "<mask>")])
def test_every_trained_tokenizer_reserves_the_objective_tokens_and_pack_records_them(tmp_path, kind, mask):
    texts = [extract_plain_text(p.read_text(errors="replace"))
             for p in sorted((DATA_DIR / "sample_site" / "handbook" / "en-US").glob("*.html"))]
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": str(i), "text": t} for i, t in enumerate(texts)]), part)
    spec = TokenizerSpec(name=kind, kind=kind, vocab_size=600, sentinels=4)
    folder = save_tokenizer(train_tokenizer(spec, [part], Sample()), tmp_path / kind)
    meta = pack([part], tmp_path / "pack", folder, serial_map, engine="tokenizers", val_fraction=0.2)
    tokenizer = load_tokenizer(folder)
    assert meta["mask_token"] == mask and meta["mask_id"] == tokenizer.token_to_id(mask)
    assert meta["sentinel_ids"] == [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(4)]
    assert json.loads((tmp_path / "pack" / "meta.json").read_text())["mask_id"] == meta["mask_id"]
    text = f"The {mask} package"
    assert mask in [tokenizer.id_to_token(i) for i in tokenizer.encode(text, add_special_tokens=False).ids]


def test_objective_must_fit_the_architecture_and_the_shards(tmp_path, shards):
    with pytest.raises(ValueError, match="objective 'mlm' does not train architecture 'decoder'"):
        TrainConfig(objective="mlm")
    assert TrainConfig(architecture="encoder_decoder").objective == "span_corruption"
    meta = json.loads((shards / "meta.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train_000000.bin", "val_000000.bin", "tokenizer.json"):
        (bare / name).write_bytes((shards / name).read_bytes())
    (bare / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("mask_id", "sentinel_ids")}))
    with pytest.raises(ValueError, match=r"meta.json: no mask_id"):
        train(TrainConfig(**TINY | dict(architecture="encoder", max_steps=2, warmup_steps=1)), bare, tmp_path / "o")
    with pytest.raises(ValueError, match=r"0 sentinel tokens.*needs 3"):
        train(TrainConfig(**TINY | dict(architecture="encoder_decoder", max_steps=2, warmup_steps=1)), bare, tmp_path / "o")


def test_fill_mask_and_sample_commands_work_for_encoders_and_encoder_decoders(tmp_path, shards):
    common = TINY | dict(max_steps=12, warmup_steps=2, checkpoint_every=12, sample_prompt="Debian")
    train(TrainConfig(**common | dict(architecture="encoder")), shards, tmp_path / "bert")
    train(TrainConfig(**common | dict(architecture="encoder_decoder")), shards, tmp_path / "t5")
    bert_sample = json.loads((tmp_path / "bert" / "samples.jsonl").read_text())
    assert bert_sample["step"] == 12 and bert_sample["text"].startswith("Debian")
    t5_sample = json.loads((tmp_path / "t5" / "samples.jsonl").read_text())
    assert t5_sample["text"].startswith("Debian => ")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    filled = subprocess.run(
        [sys.executable, "-m", "gristmill.cli", "fill-mask", str(tmp_path / "bert"), "The <mask> system and the <mask>",
         "--top-k", "3"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert filled.returncode == 0, filled.stderr[-3000:]
    lines = filled.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["mask 0", "mask 1"] and all(line.count("'") >= 6 for line in lines)
    no_mask = subprocess.run([sys.executable, "-m", "gristmill.cli", "fill-mask", str(tmp_path / "bert"), "no mask here"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert no_mask.returncode != 0 and "no <mask> token" in " ".join(no_mask.stderr.replace("│", " ").split())
    sampled = subprocess.run(
        [sys.executable, "-m", "gristmill.cli", "sample", str(tmp_path / "t5"), "--prompt", "The <extra_id_0> package",
         "--max-new-tokens", "12", "--temperature", "0"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    model, tokenizer, _ = load_model(tmp_path / "t5")
    expected = sample_text(model, tokenizer, "The <extra_id_0> package", 12, temperature=0)
    assert sampled.stdout.strip() == expected.strip() and len(expected) > len("The <extra_id_0> package => ")
