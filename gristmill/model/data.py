"""Batches from token shards: random windows of seq_len + 1 tokens, a pure function of (seed, step).

Every process draws the same global batch of window offsets from `numpy.random.default_rng([seed,
step])` and keeps its own disjoint slice (rank r of W takes rows r*B..(r+1)*B of each micro-batch),
so a resumed run sees exactly the batches it would have seen, and W processes with batch B see the
same global batch as one process with batch W*B. Windows may cross document boundaries (the EOS
token separates documents), as in nanoGPT and llm.c. The objective (objectives.py) turns windows into
inputs and targets, with one random generator per global row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gristmill.model.objectives import Batch, Objective
from gristmill.tokenize.shards import META_FILE, open_shard


@dataclass
class ShardsInfo:
    """What the trainer needs from a pack folder's `meta.json` plus the shards found beside it."""

    folder: Path
    vocab_size: int
    eos_id: int | None
    tokenizer: Path | None
    train: list[Path]
    val: list[Path]
    mask_id: int | None = None  # reserved for MLM
    sentinel_ids: list[int] | None = None  # reserved for span corruption


def read_shards_info(folder: str | Path) -> ShardsInfo:
    """Read `meta.json` (needs `vocab_size`; `eos_id` and `tokenizer` are optional) and glob
    `train_*.bin` / `val_*.bin`. A relative tokenizer path is taken relative to the folder."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no meta.json; is {folder} the output of a pack stage?")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise ValueError(f"{meta_path}: 'vocab_size' must be a positive integer, got {meta.get('vocab_size')!r}")
    tokenizer = None
    if meta.get("tokenizer"):
        tokenizer = Path(meta["tokenizer"])
        if not tokenizer.is_absolute():
            tokenizer = folder / tokenizer
    train = sorted(p for p in folder.glob("train_*.bin"))
    if not train:
        raise FileNotFoundError(f"{folder}: no train_*.bin shards")
    return ShardsInfo(
        folder=folder,
        vocab_size=meta["vocab_size"],
        eos_id=meta.get("eos_id"),
        tokenizer=tokenizer,
        train=train,
        val=sorted(folder.glob("val_*.bin")),
        mask_id=meta.get("mask_id"),
        sentinel_ids=meta.get("sentinel_ids") or [],
    )


class ShardWindows:
    """All windows of seq_len + 1 consecutive tokens in a list of shards, addressable by one
    integer (window start positions of every shard, one after another)."""

    def __init__(self, paths: list[Path], seq_len: int):
        self.seq_len = seq_len
        self.shards = [open_shard(p) for p in paths]
        starts = [max(len(s) - seq_len, 0) for s in self.shards]  # a window needs seq_len + 1 tokens
        self.cumulative = np.cumsum(starts)
        if not paths or self.cumulative[-1] == 0:
            names = ", ".join(p.name for p in paths) or "(none)"
            raise ValueError(f"shards {names}: fewer than seq_len + 1 = {seq_len + 1} tokens in every shard")

    @property
    def count(self) -> int:
        return int(self.cumulative[-1])

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), seq_len + 1) int64 tokens of the windows with these global indices."""
        shard_of = np.searchsorted(self.cumulative, indices, side="right")
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, (index, shard) in enumerate(zip(indices, shard_of)):
            offset = int(index) - (int(self.cumulative[shard - 1]) if shard else 0)
            out[row] = self.shards[shard][offset : offset + self.seq_len + 1]
        return out


class TrainLoader:
    """This process's micro-batches of step `step`: deterministic from (seed, step, rank)."""

    def __init__(
        self,
        paths: list[Path],
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        objective: Objective | None = None,
    ):
        self.windows = ShardWindows(paths, seq_len)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.objective = objective or Objective()

    def batch(self, step: int, micro_step: int) -> Batch:
        global_rows = self.batch_size * self.grad_accum * self.world_size
        step_rng = np.random.default_rng([self.seed, step])
        indices = step_rng.integers(0, self.windows.count, size=global_rows)
        first = (micro_step * self.world_size + self.rank) * self.batch_size
        rows = range(first, first + self.batch_size)
        row_rngs = [np.random.default_rng([self.seed, step, row]) for row in rows]
        return self.objective.batch(self.windows.windows(indices[first : first + self.batch_size]), row_rngs, step_rng)


def val_batches(
    paths: list[Path],
    seq_len: int,
    batch_size: int,
    n_batches: int,
    rank: int = 0,
    world_size: int = 1,
    objective: Objective | None = None,
) -> list[Batch]:
    """A fixed validation set: the first n_batches * batch_size * world_size non-overlapping
    windows of the val shards (fewer if the shards are short), split across processes, with the
    objective's randomness fixed per window."""
    objective = objective or Objective()
    windows = ShardWindows(paths, seq_len)
    wanted = n_batches * batch_size * world_size
    mine = np.arange(0, windows.count, seq_len)[:wanted][rank::world_size]
    batches = []
    for i in range(0, len(mine), batch_size):
        rows = mine[i : i + batch_size]
        row_rngs = [np.random.default_rng([0, int(start)]) for start in rows]
        batches.append(objective.batch(windows.windows(rows), row_rngs, np.random.default_rng([0, i])))
    return batches
