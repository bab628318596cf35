"""Every parallel layout on real torchrun processes (gloo on loopback, one thread each): the losses of
a split run equal those of one process on the same global batch, and its DCP checkpoint resumes
under another layout (one plain process) with the same next losses.

Tolerance: relative 1e-4 on every logged loss. The layouts add partial sums in another order (float32
rounding, about 1e-7 relative per step); AdamW amplifies that a little over six steps, far below 1e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from streamlit.testing.v1 import AppTest

from gristmill.model.config import TrainConfig
from gristmill.model.loop import train
from gristmill.model.parallel.mesh import plan_layout
from gristmill.model.parallel.pipeline import stage_layers
from gristmill.model.sample import load_checkpoint, load_model
from gristmill.pipeline.runner import run_workflow

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
STEPS, SAVED_AT = 6, 3
SETTINGS = dict(n_layer=2, n_head=4, n_embd=64, seq_len=64, tie_weights=False, max_steps=STEPS, warmup_steps=2,
                log_every=1, eval_every=STEPS, eval_batches=2, checkpoint_every=100, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]




@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> list[float]:
    """Losses of one process with a global batch of 8 sequences."""
    out = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    train(TrainConfig(**SETTINGS, batch_size=8), shards, out)
    return losses(out)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(shards_dir: Path, out: Path, processes: int, batch_size: int, parallel: dict[str, object],
             extra: dict[str, object] | None = None) -> None:
    """`torchrun -m gristmill.model.train` until SAVED_AT on `processes` CPU processes with `parallel`
    (and `extra` settings)."""
    settings = {**SETTINGS, **(extra or {}), "batch_size": batch_size, "stop_at": SAVED_AT}
    settings |= {f"parallel.{k}": v for k, v in parallel.items()}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_loopback_port()),
               "-m", "gristmill.model.train", str(shards_dir), "--out", str(out), "--device", "cpu",
               *[f"--set={key}={value}" for key, value in settings.items()]]
    result = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]


def workflow_stage(shards_dir: Path, out: Path, processes: int, batch_size: int, parallel: dict[str, object]) -> None:
    """The same, as a workflow's train stage that launches torchrun itself (`nproc_per_node`)."""
    stage = {"type": "train", "input": str(shards_dir), **SETTINGS, "batch_size": batch_size, "stop_at": SAVED_AT,
             "device": "cpu", "parallel": parallel, "nproc_per_node": processes}
    workflow = out.parent / "workflow.yaml"
    workflow.write_text(yaml.safe_dump({"name": "par", "dask": {"scheduler": "synchronous"}, "stages": {"train": stage}}))
    run_dir = run_workflow(workflow, runs_dir=out.parent / "runs", console=Console(quiet=True))
    stats = json.loads((run_dir / "train" / "stats.json").read_text())
    assert stats["counts"]["steps"] == SAVED_AT and stats["layout"]["shard"] == parallel["shard"]
    dashboard_shows_the_layout(run_dir, processes, parallel["shard"])
    (run_dir / "train").rename(out)


def dashboard_shows_the_layout(run_dir: Path, processes: int, shard: str) -> None:
    """The training page names the mesh and draws one memory bar per process."""
    os.environ["GRISTMILL_RUN"] = str(run_dir)
    at = AppTest.from_file(str(REPO / "gristmill" / "dashboards" / "app.py"), default_timeout=60)
    at.query_params["page"] = "training"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert f"mesh 1 pipeline x {processes} data x 1 tensor, shard: {shard}" in [c.value for c in at.caption]
    bars = [json.loads(chart.proto.spec)["data"] for chart in at.get("plotly_chart")]
    assert any(len(trace[0]["y"]) == processes and trace[0]["type"] == "bar" for trace in bars)


# name: (launcher, processes, batch_size per data replica, parallel settings)
LAYOUTS = {
    "zero1_as_a_workflow_stage": (workflow_stage, 2, 4, {"shard": "optimizer"}),
    "fsdp": (torchrun, 2, 4, {"shard": "full"}),
    "tensor": (torchrun, 2, 8, {"tensor": 2}),
    "pipeline_1f1b": (torchrun, 2, 8, {"pipeline": 2, "schedule": "1f1b", "microbatches": 2}),
    "data_x_tensor": (torchrun, 4, 4, {"shard": "full", "tensor": 2}),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_process_and_resumes_on_one_process(name, tmp_path, shards, reference, monkeypatch):
    launch, processes, batch_size, parallel = LAYOUTS[name]
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GRISTMILL_RUN", "")
    out = tmp_path / name
    launch(shards, out, processes, batch_size, parallel)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in records], reference[:SAVED_AT], rtol=1e-4)
    assert len(records[-1]["memory_mb_per_rank"]) == processes and min(records[-1]["memory_mb_per_rank"]) > 0
    assert records[-1]["layout"]["shard"] == parallel.get("shard", "none")
    assert records[-1]["layout"]["data"] * records[-1]["layout"]["tensor"] * records[-1]["layout"]["pipeline"] == processes
    assert (out / "checkpoint" / ".metadata").is_file() and load_checkpoint(out)["step"] == SAVED_AT

    summary = train(TrainConfig(**SETTINGS, batch_size=8), shards, out, resume=True)  # one plain process
    assert summary["steps"] == STEPS and summary["layout"] == {"pipeline": 1, "data": 1, "tensor": 1, "shard": "none"}
    np.testing.assert_allclose(losses(out), reference, rtol=1e-4)
    model, _, _ = load_model(out)  # the export holds the whole model
    assert sum(p.numel() for p in model.parameters()) == summary["params"]


@pytest.mark.parametrize(
    ("world_size", "parallel", "extra", "message"),
    [
        (3, {"tensor": 2}, {}, r"tensor \(2\) x pipeline \(1\) = 2 does not divide the 3 processes"),
        (4, {"data": 3, "tensor": 2}, {}, r"data \(3\) x tensor \(2\) x pipeline \(1\) = 6, but 4 processes"),
        (4, {"shard": "optimizer", "tensor": 2}, {}, "shard: optimizer"),
        (4, {"tensor": 2}, {}, r"data \(2\) with tensor \(2\) x pipeline \(1\) needs shard: full"),
        (4, {"pipeline": 2}, {"tie_weights": False}, r"data \(2\) with tensor \(1\) x pipeline \(2\) needs shard: full"),
        (3, {"tensor": 3}, {"n_head": 4}, r"tensor \(3\) must divide n_head \(4\)"),
        (2, {"pipeline": 2}, {"tie_weights": True}, "tie_weights: false"),
        (2, {"pipeline": 2, "microbatches": 3}, {"tie_weights": False}, r"microbatches \(3\) must divide batch_size"),
        (4, {"pipeline": 4, "microbatches": 2}, {"tie_weights": False}, "n_layer"),
        (2, {"pipeline": 2}, {"architecture": "encoder_decoder"}, "pipeline > 1 supports architecture: decoder only, "
         "not architecture: encoder_decoder"),
        (2, {"pipeline": 2}, {"architecture": "encoder"}, "not architecture: encoder"),
        (2, {"pipeline": 2}, {"position": "relative"}, "position: relative"),
    ],
)
def test_impossible_layouts_are_errors_naming_the_settings(world_size, parallel, extra, message):
    config = TrainConfig(**{**SETTINGS, "n_layer": 2, **extra}, parallel=parallel)
    with pytest.raises(ValueError, match=message):
        plan_layout(config, world_size)


@pytest.mark.parametrize("arch", [
    {"architecture": "encoder_decoder", "position": "relative", "mlp": "gelu"},  # cross-attention, T5 bias
    {"architecture": "encoder", "position": "alibi"},  # MLM head, per-head slopes
])
def test_tensor_parallel_encoder_architectures_match_one_process(arch, tmp_path, shards, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    one = tmp_path / "one"
    train(TrainConfig(**SETTINGS, **arch, batch_size=8, stop_at=SAVED_AT), shards, one)
    torchrun(shards, tmp_path / "split", 2, 8, {"tensor": 2}, arch)
    np.testing.assert_allclose(losses(tmp_path / "split"), losses(one), rtol=1e-4)


def test_unknown_parallel_setting_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match="tensr"):
        TrainConfig(parallel={"tensr": 2})


def test_pipeline_stages_take_consecutive_layers_earlier_stages_one_more():
    assert [list(stage_layers(5, 2, i)) for i in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(4, 4, i)) for i in range(4)] == [[0], [1], [2], [3]]


def test_a_checkpoint_never_published_is_ignored_and_replaced_on_resume(tmp_path, shards, reference):
    out = tmp_path / "killed"
    train(TrainConfig(**SETTINGS, batch_size=8, stop_at=SAVED_AT), shards, out)
    staged = out / "checkpoint.partial"  # as a save killed before its rename leaves it
    staged.mkdir()
    (staged / "__0_0.distcp").write_bytes(b"torn")
    train(TrainConfig(**SETTINGS, batch_size=8), shards, out, resume=True)
    assert losses(out) == reference
    assert not staged.exists() and load_checkpoint(out)["step"] == STEPS
