"""Start `torchrun` for a workflow's train stage (`nproc_per_node` > 1): the same command a person
would type, on this machine, with the stage's settings in a YAML file beside its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gristmill.model.config import TrainConfig

SETTINGS_FILE = "train-settings.yaml"


def torchrun_train(config: TrainConfig, shards_dir: Path, out_dir: Path, resume: bool, nproc_per_node: int) -> dict[str, Any]:
    """Run `torchrun --standalone --nproc_per_node N -m gristmill.model.train` and return rank 0's
    summary; a failed run raises with the end of its output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = out_dir / SETTINGS_FILE
    settings.write_text(yaml.safe_dump(config.model_dump()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
               "-m", "gristmill.model.train", str(shards_dir), "--out", str(out_dir), "--config", str(settings),
               *(["--resume"] if resume else [])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"torchrun with {nproc_per_node} processes failed (exit {result.returncode}): {tail}")
    return json.loads(result.stdout[result.stdout.index("{"):])
