"""How every benchmark times its two sides, so that the comparison is like for like.

A helper the benchmarks import, not a benchmark: it has no `--quick` mode and prints nothing.

- Threads are pinned to `THREADS` (one) before any work: Hugging Face tokenizers' Rayon pool
  (`RAYON_NUM_THREADS`, `TOKENIZERS_PARALLELISM`) and Arrow's CPU and I/O pools. numpy's ufuncs
  and everything else these benchmarks run are single-threaded already.
- Each side runs once untimed (the warm-up: imports, models, caches), then `rounds` rounds
  alternate the sides (gristmill, reference, gristmill, ...), so a slow spell of the shared machine
  hits both.
- The figure per side is its best round in CPU seconds of this process and its finished children
  (datatrove runs Trafilatura in a subprocess). With one thread per side, CPU seconds are the
  time one core was busy, and do not grow when other jobs share the machine's cores the way
  wall time does. Wall times are kept too, and printed.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

THREADS = 1
ROUNDS = 3


def pin_threads(threads: int = THREADS) -> None:
    """Limit the thread pools of the tools measured to `threads`; call before the first encode."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have finished."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Timing:
    """One side's rounds: CPU and wall seconds of each, and the last round's return value."""

    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def best_cpu_s(self) -> float:
        return min(self.cpu_s)

    @property
    def best_wall_s(self) -> float:
        return min(self.wall_s)


def interleaved(sides: dict[str, Callable[[], Any]], rounds: int = ROUNDS,
                warm_up: dict[str, Callable[[], Any]] | None = None) -> dict[str, Timing]:
    """One untimed run of every side (or of its `warm_up` callable), then `rounds` rounds in turn."""
    for name, fn in sides.items():
        (warm_up or {}).get(name, fn)()
    timings = {name: Timing() for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            cpu, wall = cpu_seconds(), time.perf_counter()
            timings[name].result = fn()
            timings[name].cpu_s.append(cpu_seconds() - cpu)
            timings[name].wall_s.append(time.perf_counter() - wall)
    for name, timing in timings.items():
        rounds_text = ", ".join(f"{c:.3f}" for c in timing.cpu_s)
        print(f"{name}: CPU s per round {rounds_text} (best {timing.best_cpu_s:.3f}; best wall "
              f"{timing.best_wall_s:.3f} s; CPU/wall {sum(timing.cpu_s) / sum(timing.wall_s):.2f})", file=sys.stderr)
    return timings
