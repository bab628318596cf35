"""Training on real token shards: overfitting, exact resume, DDP, sampling, the workflow stage.

The shards are written here from the bundled handbook pages, encoded with a small byte-level BPE
trained on them, exactly as the pack stage lays them out (meta.json + train_*.bin / val_*.bin).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gristmill.model.config import TrainConfig
from gristmill.model.data import TrainLoader, read_shards_info, val_batches
from gristmill.model.loop import train
from gristmill.model.objectives import Objective
from gristmill.model.sample import load_checkpoint
from gristmill.pipeline.runner import run_workflow
from gristmill.tokenize.shards import open_shard
from tests.model_fixtures import write_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(n_layer=2, n_head=4, n_embd=64, seq_len=64, batch_size=8, progress=False, log_every=1)


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_loader_is_deterministic_and_ranks_take_disjoint_slices(shards):
    paths = read_shards_info(shards).train
    one = TrainLoader(paths, 64, batch_size=8, grad_accum=1, seed=3)
    assert torch.equal(one.batch(5, 0).x, TrainLoader(paths, 64, 8, 1, seed=3).batch(5, 0).x)
    assert not torch.equal(one.batch(5, 0).x, one.batch(6, 0).x)
    halves = [TrainLoader(paths, 64, 4, 1, seed=3, rank=r, world_size=2).batch(5, 0) for r in (0, 1)]
    assert torch.equal(torch.cat([h.x for h in halves]), one.batch(5, 0).x)
    batch = one.batch(5, 0)
    assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # targets are the inputs shifted by one


def test_prefix_lm_batches_drop_targets_inside_the_prefix(shards):
    objective = Objective(name="prefix_lm")
    batch = TrainLoader(read_shards_info(shards).train, 64, 8, 1, seed=3, objective=objective).batch(1, 0)
    for row, prefix in enumerate(batch.prefix_len.tolist()):
        assert (batch.y[row, : prefix - 1] == -1).all() and (batch.y[row, prefix - 1 :] >= 0).all()


def test_bad_shard_folders_give_errors_naming_the_file(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_shards_info(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": "many"}))
    with pytest.raises(ValueError, match="vocab_size"):
        read_shards_info(tmp_path)
    with pytest.raises(ValueError, match="val_000000.bin"):
        val_batches(read_shards_info(shards).val, seq_len=100_000, batch_size=1, n_batches=1)


def test_tiny_model_overfits_a_small_shard_below_the_unigram_entropy(tmp_path, handbook_texts):
    small = write_shards(tmp_path / "small", handbook_texts[:1], vocab_size=334, val_fraction=0.2)  # 300 + the 34 reserved tokens
    counts = np.bincount(np.asarray(open_shard(small / "train_000000.bin")))
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats: the loss of the best context-free model
    config = TrainConfig(
        **TINY | dict(max_steps=300, warmup_steps=10, learning_rate=1e-2, weight_decay=0.0, eval_every=300)
    )
    summary = train(config, small, tmp_path / "out")
    assert summary["steps"] == 300
    assert summary["final_loss"] < 0.5 * unigram_entropy, (summary["final_loss"], unigram_entropy)
    assert math.isfinite(summary["val_loss"])


def test_stopped_and_resumed_run_matches_an_uninterrupted_run_exactly(tmp_path, shards):
    config = TrainConfig(**TINY | dict(max_steps=16, warmup_steps=4, eval_every=8, checkpoint_every=100))
    train(config, shards, tmp_path / "straight")
    train(config.model_copy(update={"stop_at": 7}), shards, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed")["step"] == 7
    summary = train(config, shards, tmp_path / "resumed", resume=True)
    assert summary["steps"] == 16
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 17))
    assert resumed == straight  # bit for bit
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == {"seed": config.seed, "next_step": 17} and a["rng"]["torch"][0].dtype == torch.uint8


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path, shards):
    common = ["--max-steps", "8", "--n-layer", "2", "--n-embd", "64", "--seq-len", "64",
              "--set", "warmup_steps=2", "--set", "log_every=1", "--set", "progress=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    two = subprocess.run(
        [*torchrun, "-m", "gristmill.model.train", str(shards), "--out", str(tmp_path / "ddp"),
         "--batch-size", "4", *common],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    train(TrainConfig(**TINY | dict(max_steps=8, warmup_steps=2)), shards, tmp_path / "single")
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    assert [s for s, _ in ddp] == [s for s, _ in single] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in ddp], [v for _, v in single], rtol=1e-4)
    a, b = load_checkpoint(tmp_path / "ddp")["model"], load_checkpoint(tmp_path / "single")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_sample_command_prints_text_from_the_trained_tokenizer(tmp_path, shards):
    config = TrainConfig(**TINY | dict(max_steps=30, warmup_steps=5, checkpoint_every=15, sample_prompt="Debian"))
    train(config, shards, tmp_path / "model")
    samples = [json.loads(line) for line in (tmp_path / "model" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [15, 30] and all(s["text"].startswith("Debian") for s in samples)
    result = subprocess.run(
        [sys.executable, "-m", "gristmill.cli", "sample", str(tmp_path / "model"), "--prompt", "The package",
         "--max-new-tokens", "30", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout.strip()
    assert text.startswith("The package") and len(text) > len("The package") + 10


def test_train_stage_in_a_workflow_writes_stats_and_resumes_as_done(tmp_path, shards):
    workflow = tmp_path / "tiny.yaml"
    stage = {"type": "train", "input": str(shards), **TINY, "max_steps": 12, "warmup_steps": 2, "eval_every": 6}
    workflow.write_text(yaml.safe_dump({"name": "tiny", "dask": {"scheduler": "synchronous"}, "stages": {"train": stage}}))
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    stats = json.loads((run_dir / "train" / "stats.json").read_text())
    assert stats["counts"] == {"steps": 12, "tokens": 12 * 8 * 64}
    assert stats["final_loss"] < math.log(512) and stats["val_loss"] > 0 and stats["tokens_per_sec"] > 0
    assert (run_dir / "train" / "checkpoint.pt").is_file() and (run_dir / "train" / "samples.jsonl").is_file()
    before = (run_dir / "train" / "checkpoint.pt").stat().st_mtime_ns
    run_workflow(workflow, runs_dir=tmp_path / "runs")  # done: skipped, the checkpoint is untouched
    assert (run_dir / "train" / "checkpoint.pt").stat().st_mtime_ns == before


def test_diverging_run_stops_on_the_first_nan_keeps_the_last_good_checkpoint_and_exits_non_zero(tmp_path, shards):
    out = tmp_path / "diverged"
    settings = [f"--set={k}={v}" for k, v in (TINY | dict(warmup_steps=1, checkpoint_every=2)).items()]
    result = subprocess.run(
        [sys.executable, "-m", "gristmill.model.train", str(shards), "--out", str(out), "--max-steps", "40",
         "--lr", "1e4", "--device", "cpu", *settings],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "training diverged at step" in message and "last finite loss" in message, message
    diverged_at = int(message.split("training diverged at step ")[1].split()[0])
    checkpoint = load_checkpoint(out)
    assert checkpoint["step"] < diverged_at
    assert all(torch.isfinite(w).all() for w in checkpoint["model"].values())
    logged = losses(out)
    assert logged and all(math.isfinite(loss) for _, loss in logged) and logged[-1][0] < diverged_at
