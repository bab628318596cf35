"""The quickstart workflow, shrunk for tests: the same DAG and stages, fewer training steps."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "workflows" / "quickstart.yaml"

# The whole DAG still runs for real (crawl on loopback through training); only the model is
# smaller and trains for fewer steps, so the run takes well under a minute on 2 cores.
QUICKSTART_TEST_OVERRIDES = [
    "train.n_layer=2",
    "train.n_embd=64",
    "train.max_steps=40",
    "train.warmup_steps=5",
    "train.eval_every=20",
    "train.checkpoint_every=20",
    "train.log_every=5",
]
