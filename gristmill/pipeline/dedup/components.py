"""Connected components of a graph whose edges live in hash-partitioned files, as rounds of tasks.

Min-label propagation with one shuffle per round. Every node starts labelled with its own id. In
each round one task per partition takes the messages sent to its nodes, lowers each node's label
to the smallest it received, and for every node whose label dropped sends the new label along its
edges, into the partitions of the neighbours. A round that sends no message ends it: every node
then holds the smallest node id of its component. Rounds grow with the graph's diameter (a star
of duplicates settles in two or three), not with its size.

A task holds one partition's edges, labels and incoming messages, never the whole graph; the
client only adds up counts. Files under `folder`:

    edges/p-XXXXX/*.parquet       (src, dst) directed edges, both directions, by partition of src
    adjacency/p-XXXXX.parquet     the same, de-duplicated and sorted by src (written by round 0)
    labels/r-RRRR/p-XXXXX.parquet (node, label) after round R
    messages/r-RRRR/to-XXXXX/from-YYYYY.parquet   (node, label) sent in round R
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from gristmill.pipeline import io, storage
from gristmill.pipeline.dedup.minhash import fmix64

Mapper = Callable[[Callable, list, str], list]


def partition_of(nodes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (0 .. partitions - 1) a node's edges, label and messages live in."""
    return (fmix64(np.asarray(nodes, np.int64).view(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def scatter(table: pa.Table, to: np.ndarray, partitions: int, path_of: Callable[[int], Path]) -> None:
    """Write the rows of `table` with `to == k` to `path_of(k)`, for every k that gets rows."""
    order = np.argsort(to, kind="stable")
    bounds = np.searchsorted(to[order], np.arange(partitions + 1))
    for k in np.flatnonzero(np.diff(bounds)):
        io.write_parquet_atomic(table.take(pa.array(order[bounds[k] : bounds[k + 1]])), path_of(int(k)))


def _partition_dir(folder: Path, kind: str, partition: int) -> Path:
    return folder / kind / f"p-{partition:05d}"


def write_edges(folder: Path, name: str, u: np.ndarray, v: np.ndarray, partitions: int) -> None:
    """Add the undirected edges `(u[i], v[i])` to the graph, both directions, as file `name`."""
    src = np.concatenate([u, v]).astype(np.int64)
    dst = np.concatenate([v, u]).astype(np.int64)
    scatter(pa.table({"src": src, "dst": dst}), partition_of(src, partitions), partitions,
            lambda k: _partition_dir(folder, "edges", k) / f"{name}.parquet")


def _labels_path(folder: Path, round_: int, partition: int) -> Path:
    return folder / "labels" / f"r-{round_:04d}" / f"p-{partition:05d}.parquet"


def read_columns(files: list[Path], columns: list[str]) -> list[np.ndarray]:
    """`columns` of the Parquet `files` together, as numpy arrays (empty int64 when no files)."""
    if not files:
        return [np.zeros(0, np.int64) for _ in columns]
    table = pa.concat_tables(storage.read_parquet(f, columns=columns) for f in files)
    return [table.column(c).to_numpy() for c in columns]


def _start(folder: Path, partition: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round 0: de-duplicate the partition's edges into its adjacency; every node its own label."""
    src, dst = read_columns(io.list_parts(_partition_dir(folder, "edges", partition)), ["src", "dst"])
    if len(src):
        pairs = np.unique(np.stack([src, dst], axis=1), axis=0)
        src, dst = pairs[:, 0], pairs[:, 1]
    io.write_parquet_atomic(pa.table({"src": src, "dst": dst}), folder / "adjacency" / f"p-{partition:05d}.parquet")
    nodes = np.unique(src)
    return nodes, nodes.copy(), np.ones(len(nodes), bool), (src, dst)


def propagate(item: tuple[int, int], folder: str, partitions: int) -> dict[str, int]:
    """One round for one partition: lower labels by the messages received, send what dropped."""
    round_, partition = item
    root = storage.location(folder)
    if round_ == 0:
        nodes, labels, changed, (src, dst) = _start(root, partition)
    else:
        previous = storage.read_parquet(_labels_path(root, round_ - 1, partition))
        nodes, old = previous.column("node").to_numpy(), previous.column("label").to_numpy()
        inbox = root / "messages" / f"r-{round_ - 1:04d}" / f"to-{partition:05d}"
        to, label = read_columns(io.list_parts(inbox), ["node", "label"])
        labels = old.copy()
        np.minimum.at(labels, np.searchsorted(nodes, to), label)
        changed = labels < old
        src, dst = read_columns([root / "adjacency" / f"p-{partition:05d}.parquet"], ["src", "dst"])
    io.write_parquet_atomic(pa.table({"node": nodes, "label": labels}), _labels_path(root, round_, partition))
    # Send along the edges of nodes whose label dropped; a label no smaller than the neighbour's
    # own id cannot lower the neighbour's label, so it is not sent.
    source = np.searchsorted(nodes, src)
    active = changed[source]
    send_to, send_label = dst[active], labels[source[active]]
    useful = send_label < send_to
    send_to, send_label = send_to[useful], send_label[useful]
    if len(send_to):
        order = np.lexsort((send_label, send_to))
        send_to, send_label = send_to[order], send_label[order]
        first = np.ones(len(send_to), bool)
        first[1:] = send_to[1:] != send_to[:-1]
        send_to, send_label = send_to[first], send_label[first]  # the smallest label per neighbour
        scatter(pa.table({"node": send_to, "label": send_label}), partition_of(send_to, partitions), partitions,
                lambda k: root / "messages" / f"r-{round_:04d}" / f"to-{k:05d}" / f"from-{partition:05d}.parquet")
    return {"changed": int(changed.sum()), "sent": int(len(send_to))}


@dataclass(frozen=True)
class Components:
    """Where the final labels are and how the rounds went (for the stage's stats)."""

    labels_dir: Path
    rounds: int
    changed_per_round: list[int]
    nodes: int

    def labels(self, partition: int) -> pa.Table:
        """`(node, label)` of the nodes in `partition`; label = the smallest node of its component."""
        return storage.read_parquet(self.labels_dir / f"p-{partition:05d}.parquet")


def label_components(folder: Path, partitions: int, mapper: Mapper, description: str) -> Components:
    """Run rounds until no label changes; the edges must be in `folder/edges` (`write_edges`)."""
    task = functools.partial(propagate, folder=str(folder), partitions=partitions)
    changed_per_round: list[int] = []
    round_ = 0
    while True:
        results = mapper(task, [(round_, p) for p in range(partitions)], f"{description} round {round_ + 1}")
        changed_per_round.append(sum(r["changed"] for r in results))
        storage.remove_tree(folder / "messages" / f"r-{round_ - 1:04d}")  # read by this round
        storage.remove_tree(folder / "labels" / f"r-{round_ - 1:04d}")
        if sum(r["sent"] for r in results) == 0:
            return Components(folder / "labels" / f"r-{round_:04d}", round_ + 1, changed_per_round[1:],
                              changed_per_round[0])
        round_ += 1
