"""The `dedup` stage: exact and MinHash-LSH near-duplicate removal across the whole dataset.

Map -> shuffle -> reduce, with hash-partitioned Parquet files in the stage folder between steps,
so no process ever holds more than one partition's signatures, edges or clusters, and the client
holds only counts:

1. sign (one task per input part): normalise, exact hash, MinHash signature, LSH band hashes;
   write rows `(band, hash, key)` to `work/shuffle/bucket-B/part-P.parquet` by `hash % buckets`
   (band -1 is the exact-text hash, band -2 the URL hash). `key` = part << 32 | row.
2. group (one task per bucket): documents sharing a `(band, hash)` become candidate edges (each
   to the smallest key of its group), rows matching an earlier run's index `seen` edges to that
   earlier document; all written to `work/candidates/` by the partition of their first end.
3. verify (one task per edge partition): candidate edges from bands are checked by true Jaccard
   of the shingles (`verify: jaccard`, shingles saved by step 1) or the signature estimate
   (`signature`); exact/URL/seen edges need not. What holds goes into the graph, `work/graph/`.
4. components (components.py): rounds of min-label propagation, one task per partition each,
   until no label changes; then each document's label goes to its part, joined with its facts
   (id, length, hashes), and on to its cluster's partition (`work/clusters/`).
5. survivors (one task per cluster partition): one survivor per cluster (`survivor: earliest_id`
   or `longest`), chosen from document facts, never from partitioning; decisions to `work/decisions/`.
6. write (one task per part): `kept/` and `removed/` part for part, with `dup_cluster` and
   `dup_survivor`, and the survivors' band/exact hashes into `index/` for later incremental runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gristmill.pipeline import io, storage
from gristmill.pipeline.dedup import minhash as mh
from gristmill.pipeline.dedup.components import (
    label_components,
    partition_of,
    read_columns,
    scatter,
    write_edges,
)
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage

EXACT_BAND = -1
URL_BAND = -2
REASON_EXACT = "dedup:exact"
REASON_URL = "dedup:url"
REASON_NEAR = "dedup:near"
REASON_SEEN = "dedup:seen_before"
HEAD_CHARS = 300  # text shown per document in the stats' cluster samples
SAMPLE_MEMBERS = 8  # documents shown per sampled cluster
CLUSTER_SIZE_EDGES = [2, 3, 4, 5, 10, 20, 50, 100, 1000]
# Settings an index must share with the run that reads it, or band hashes would not match.
INDEX_KEYS = ("num_perm", "scheme", "bands", "rows", "seed", "shingle", "ngram", "normalise", "url")


class NormaliseConfig(BaseModel):
    """Text normalisation before hashing; the defaults make case, punctuation and unicode
    variants (full-width letters, ligatures) count as the same text."""

    model_config = ConfigDict(extra="forbid")

    nfkc: bool = True
    lowercase: bool = True
    punctuation: bool = True
    digits: bool = False

    def settings(self) -> mh.Normalisation:
        return mh.Normalisation(**self.model_dump())


class DedupConfig(StageConfig):
    """Exact + near-duplicate removal. The README (dedup) lists every key and its default."""

    exact: bool = True
    url: bool = False
    near: bool = True
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(5, ge=1, le=64)
    normalise: NormaliseConfig = NormaliseConfig()
    num_perm: int = Field(128, ge=8, le=1024)
    scheme: Literal["one_permutation", "datasketch"] = "one_permutation"
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    # Every candidate is verified, so a false positive costs one check and a false negative a
    # duplicate that stays: weigh the LSH shape towards recall (128 perms at 0.8 -> 16 x 8).
    false_positive_weight: float = Field(0.05, ge=0.0)
    false_negative_weight: float = Field(0.95, ge=0.0)
    verify: Literal["jaccard", "signature", "none"] = "jaccard"
    survivor: Literal["earliest_id", "longest"] = "earliest_id"
    seed: int = 1
    shuffle_partitions: int | None = Field(None, ge=1, le=4096)
    index_from: str | None = None
    sample_clusters: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _check_bands(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither (then they follow from `threshold`)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} is more than num_perm = {self.num_perm}")
        return self

    def bands_rows(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        return mh.optimal_bands_rows(self.threshold, self.num_perm, self.false_positive_weight,
                                     self.false_negative_weight)


@dataclass(frozen=True)
class Plan:
    """What every task needs to know: the config, the LSH shape and where the work files live."""

    config: DedupConfig
    bands: int
    rows: int
    buckets: int  # shuffle buckets, and partitions of the edge graph and of the clusters
    parts: int
    stage_dir: str
    earlier_index: str | None
    batch: int

    @property
    def work(self) -> Path:
        return storage.location(self.stage_dir) / "work"


def _key(part: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(part) << np.int64(32)) | rows.astype(np.int64)


def _part_of(keys: np.ndarray) -> np.ndarray:
    return keys >> np.int64(32)


def _row_of(keys: np.ndarray) -> np.ndarray:
    return keys & np.int64(0xFFFFFFFF)


def _read_documents(path: str, columns: list[str]) -> pa.Table:
    schema = storage.parquet_file(path).schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"dedup: {path} has no column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})")
    return storage.read_parquet(path, columns=columns)


def _flat(column: pa.ChunkedArray) -> pa.Array:
    """One string array from a column (a column of no chunks or of nulls only gives strings)."""
    column = column.cast(pa.string())
    return column.combine_chunks() if column.num_chunks else pa.array([], pa.string())


# ---------------------------------------------------------------------------------------------
# 1. sign


def sign_part(item: tuple[int, str], plan: Plan) -> dict[str, Any]:
    """Hash one input part and scatter its `(band, hash, key)` rows into the shuffle buckets."""
    part, path = item
    started = time.perf_counter()
    config = plan.config
    with_url = "url" in storage.parquet_file(path).schema_arrow.names
    table = _read_documents(path, ["id", "text"] + (["url"] if with_url else []))
    n = table.num_rows
    texts = _flat(table.column("text"))
    normalised = mh.normalise_texts(texts, config.normalise.settings())
    exact = mh.hash_strings(normalised)
    urls = pc.fill_null(_flat(table.column("url")) if with_url else pa.nulls(n, pa.string()), "")
    has_url = np.asarray(pc.greater(pc.binary_length(urls), 0), dtype=bool)
    url_hash = np.where(has_url, mh.hash_strings(urls), np.uint64(0))
    lengths = np.asarray(pc.fill_null(pc.utf8_length(texts), 0), dtype=np.int64)
    io.write_parquet_atomic(
        pa.table({"id": table.column("id"), "length": lengths, "exact": exact, "url": url_hash}),
        plan.work / "docs" / io.part_name(part),
    )
    rows = np.arange(n, dtype=np.int64)
    keys = _key(part, rows)
    band_ids, hashes, row_keys = [], [], []
    if config.exact:
        band_ids.append(np.full(n, EXACT_BAND, np.int16))
        hashes.append(exact)
        row_keys.append(keys)
    if config.url:
        band_ids.append(np.full(int(has_url.sum()), URL_BAND, np.int16))
        hashes.append(url_hash[has_url])
        row_keys.append(keys[has_url])
    no_shingles = 0
    if config.near:
        shingle_hashes, offsets = mh.shingle_hashes(normalised, config.shingle, config.ngram)
        signatures = mh.signatures_for(shingle_hashes, offsets, config.scheme, config.num_perm, config.seed)
        bands = mh.band_hashes(signatures, plan.bands, plan.rows)
        has_shingles = np.diff(offsets) > 0
        no_shingles = int(n - has_shingles.sum())
        if config.verify == "signature":
            storage.save_array(signatures, plan.work / "signatures" / f"part-{part:05d}.npy")
        if config.verify == "jaccard":  # read back, a few rows at a time, by the verify step
            storage.save_array(shingle_hashes, plan.work / "shingles" / f"part-{part:05d}.npy")
            storage.save_array(offsets, plan.work / "shingles" / f"offsets-{part:05d}.npy")
        storage.save_array(bands, plan.work / "bands" / f"part-{part:05d}.npy")
        signed = np.flatnonzero(has_shingles)
        band_ids.append(np.tile(np.arange(plan.bands, dtype=np.int16), len(signed)))
        hashes.append(bands[signed].reshape(-1))
        row_keys.append(np.repeat(keys[signed], plan.bands))
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    scatter(pa.table({"band": np.concatenate(band_ids) if band_ids else np.zeros(0, np.int16), "hash": hashes,
                      "key": np.concatenate(row_keys) if row_keys else np.zeros(0, np.int64)}),
            (hashes % np.uint64(plan.buckets)).astype(np.int64), plan.buckets,
            lambda b: plan.work / "shuffle" / f"bucket-{b:05d}" / io.part_name(part))
    return {"part": part, "rows": n, "no_shingles": no_shingles, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# 2. group

EDGE_EXACT, EDGE_BAND, EDGE_SEEN = 0, 1, 2  # kinds of candidate edge: need no check, need one, earlier run


def earlier_nodes(ids: pa.Array) -> np.ndarray:
    """Graph nodes for documents of an earlier run, from their ids: negative (never a batch key),
    the same in every bucket. A 62-bit hash: a collision could only join two earlier clusters."""
    return np.int64(-1) - (mh.hash_strings(ids) >> np.uint64(2)).astype(np.int64)


def group_bucket(bucket: int, plan: Plan) -> dict[str, int]:
    """Candidate edges `(u, v, kind)` of one bucket, u the smallest key of its `(band, hash)` group,
    scattered by the partition of u into `work/candidates/`. Rows matching an earlier run's index
    become `seen` edges to that earlier document, whose id goes to `work/earlier/`."""
    files = io.list_parts(plan.work / "shuffle" / f"bucket-{bucket:05d}")
    if not files:
        return {"seen": 0}
    rows = pa.concat_tables(storage.read_parquet(f) for f in files)
    groups = rows.group_by(["band", "hash"]).aggregate([("key", "min"), ("key", "count")])
    groups = groups.filter(pc.greater(groups.column("key_count"), 1)).drop_columns(["key_count"])
    members = rows.join(groups, keys=["band", "hash"], join_type="inner")
    members = members.filter(pc.not_equal(members.column("key"), members.column("key_min")))
    u, v = [members.column("key_min").to_numpy()], [members.column("key").to_numpy()]
    kind = [np.where(members.column("band").to_numpy() >= 0, EDGE_BAND, EDGE_EXACT).astype(np.int8)]
    seen = 0
    index_files = io.list_parts(storage.location(plan.earlier_index) / f"bucket-{bucket:05d}") if plan.earlier_index else []
    if index_files:
        index = pa.concat_tables(storage.read_parquet(f) for f in index_files)
        earliest = index.group_by(["band", "hash"]).aggregate([("id", "min")])
        matched = rows.join(earliest, keys=["band", "hash"], join_type="inner")
        ids = _flat(matched.column("id_min"))
        nodes = earlier_nodes(ids)
        seen = matched.num_rows
        u.append(matched.column("key").to_numpy())
        v.append(nodes)
        kind.append(np.full(seen, EDGE_SEEN, np.int8))
        scatter(pa.table({"node": nodes, "id": ids}), partition_of(nodes, plan.buckets), plan.buckets,
                lambda k: plan.work / "earlier" / f"p-{k:05d}" / f"bucket-{bucket:05d}.parquet")
    u, v, kind = np.concatenate(u), np.concatenate(v), np.concatenate(kind)
    scatter(pa.table({"u": u, "v": v, "kind": kind}), partition_of(u, plan.buckets), plan.buckets,
            lambda k: plan.work / "candidates" / f"p-{k:05d}" / f"bucket-{bucket:05d}.parquet")
    return {"seen": seen}


# ---------------------------------------------------------------------------------------------
# 3. verify


def verify_partition(partition: int, plan: Plan) -> dict[str, int]:
    """De-duplicate one partition's candidate edges (all copies of an edge share the partition of
    its first end), check those found by bands, and add what holds to the graph (`work/graph/`)."""
    u, v, kind = read_columns(io.list_parts(plan.work / "candidates" / f"p-{partition:05d}"), ["u", "v", "kind"])
    exact = _unique_pairs(u[kind == EDGE_EXACT], v[kind == EDGE_EXACT])
    band = _unique_pairs(u[kind == EDGE_BAND], v[kind == EDGE_BAND])
    seen = _unique_pairs(u[kind == EDGE_SEEN], v[kind == EDGE_SEEN])
    accepted = band
    if plan.config.verify != "none" and len(band):
        accepted = band[_similar(band[:, 0], band[:, 1], plan)]
    edges = np.concatenate([exact, accepted, seen])
    write_edges(plan.work / "graph", f"from-{partition:05d}", edges[:, 0], edges[:, 1], plan.buckets)
    return {"exact": len(exact), "candidates": len(band), "verified": len(accepted)}


def _similar(u: np.ndarray, v: np.ndarray, plan: Plan) -> np.ndarray:
    """Which document pairs `(u[i], v[i])` are at least `threshold` similar (by `verify`)."""
    config = plan.config
    if config.verify == "signature":
        loaded: dict[int, np.ndarray] = {}

        def signature(keys: np.ndarray) -> np.ndarray:
            out = np.empty((len(keys), config.num_perm), np.uint32)
            for p in np.unique(_part_of(keys)):
                if p not in loaded:
                    loaded[p] = storage.load_array(plan.work / "signatures" / f"part-{p:05d}.npy")
                mask = _part_of(keys) == p
                out[mask] = loaded[p][_row_of(keys[mask])]
            return out

        return mh.estimated_jaccard(signature(u), signature(v)) >= config.threshold
    documents = np.unique(np.concatenate([u, v]))
    hashes, offsets = _shingles_of(documents, plan)
    similarity = mh.jaccard_pairs(hashes, offsets, np.searchsorted(documents, u), np.searchsorted(documents, v))
    return similarity >= config.threshold


def _shingles_of(keys: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes and offsets of the documents `keys` (sorted), from the sign step's files
    (memory-mapped: only the rows asked for are read)."""
    pieces, counts = [], []
    for p in np.unique(_part_of(keys)):
        rows = _row_of(keys[_part_of(keys) == p])
        hashes = storage.load_array(plan.work / "shingles" / f"part-{p:05d}.npy")
        offsets = storage.load_array(plan.work / "shingles" / f"offsets-{p:05d}.npy")
        starts, lengths = np.asarray(offsets[rows]), np.asarray(offsets[rows + 1]) - np.asarray(offsets[rows])
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pieces.append(np.asarray(hashes[np.repeat(starts, lengths) + within]))
        counts.append(lengths)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint64),
            np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# 4. components (components.py) and survivors


def scatter_members(partition: int, plan: Plan, labels_dir: str) -> None:
    """Send the component label of each batch document in one label partition to its input part
    (`work/members/`), and each earlier document, with its id, to its cluster's partition."""
    labels = storage.read_parquet(storage.location(labels_dir) / f"p-{partition:05d}.parquet")
    node, label = labels.column("node").to_numpy(), labels.column("label").to_numpy()
    batch = node >= 0
    scatter(pa.table({"key": node[batch], "label": label[batch]}), _part_of(node[batch]), plan.parts,
            lambda p: plan.work / "members" / f"part-{p:05d}" / f"from-{partition:05d}.parquet")
    if batch.all():
        return
    known, ids = read_columns(io.list_parts(plan.work / "earlier" / f"p-{partition:05d}"), ["node", "id"])
    # Per node its smallest id: the ids of one node are equal unless two earlier ids share a hash.
    order = np.lexsort((ids.astype(str), known))
    known, ids = known[order], ids[order]
    first = np.searchsorted(known, node[~batch])
    earlier = pa.table({"label": label[~batch], "key": node[~batch], "id": pa.array(ids[first].tolist(), pa.string()),
                        "length": np.zeros(len(first), np.int64), "exact": np.zeros(len(first), np.uint64),
                        "url": np.zeros(len(first), np.uint64)})
    scatter(earlier, partition_of(label[~batch], plan.buckets), plan.buckets,
            lambda k: plan.work / "clusters" / f"c-{k:05d}" / f"earlier-{partition:05d}.parquet")


def gather_facts(part: int, plan: Plan) -> None:
    """Join one input part's clustered documents with their facts (id, length, exact and URL
    hash) and send them to their cluster's partition (`work/clusters/`)."""
    key, label = read_columns(io.list_parts(plan.work / "members" / f"part-{part:05d}"), ["key", "label"])
    if len(key) == 0:
        return
    docs = storage.read_parquet(plan.work / "docs" / io.part_name(part)).take(pa.array(_row_of(key)))
    facts = pa.table({"label": label, "key": key, "id": docs.column("id").cast(pa.string()),
                      "length": docs.column("length"), "exact": docs.column("exact"), "url": docs.column("url")})
    scatter(facts, partition_of(label, plan.buckets), plan.buckets,
            lambda k: plan.work / "clusters" / f"c-{k:05d}" / f"part-{part:05d}.parquet")


def cluster_name(survivor_id: str) -> str:
    """A short, stable cluster name derived from the survivor's id (same in every run)."""
    return hashlib.blake2b(survivor_id.encode(), digest_size=6).hexdigest()


def choose_survivors(partition: int, plan: Plan) -> dict[str, Any]:
    """Decide every batch document of the clusters in one partition: key, cluster, survivor id,
    reason (null for the survivor), scattered to `work/decisions/` by input part. Returns the
    partition's cluster sizes and its largest clusters for the stats.

    Keys `< 0` are documents of the earlier index; a cluster that holds one is removed entirely
    (`dedup:seen_before`) in favour of the smallest earlier id.
    """
    files = io.list_parts(plan.work / "clusters" / f"c-{partition:05d}")
    if not files:
        return {"clusters": 0, "largest": 0, "size_counts": _size_counts(np.zeros(0, np.int64)), "sample": []}
    table = pa.concat_tables(storage.read_parquet(f) for f in files)
    keys, clusters = table.column("key").to_numpy(), table.column("label").to_numpy()
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    earlier_of: dict[int, str] = {}
    for cluster, earlier in zip(clusters[keys < 0].tolist(), ids[keys < 0].tolist()):
        if cluster not in earlier_of or earlier < earlier_of[cluster]:
            earlier_of[cluster] = earlier
    batch = keys >= 0
    keys, clusters, ids = keys[batch], clusters[batch], ids[batch]
    length, exact, url = (table.column(c).to_numpy()[batch] for c in ("length", "exact", "url"))
    if plan.config.survivor == "longest":
        order = np.lexsort((ids.astype(str), -length, clusters))
    else:
        order = np.lexsort((ids.astype(str), clusters))
    keys, clusters, ids, length, exact, url = (x[order] for x in (keys, clusters, ids, length, exact, url))
    first = np.ones(len(keys), dtype=bool)
    first[1:] = clusters[1:] != clusters[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))
    survivor_ids = ids[head]
    reasons = np.where(exact == exact[head], REASON_EXACT,
                       np.where((url == url[head]) & (url != 0), REASON_URL, REASON_NEAR)).astype(object)
    reasons[first] = None
    seen = np.array([int(c) in earlier_of for c in clusters], dtype=bool)
    if seen.any():
        survivor_ids[seen] = [earlier_of[int(c)] for c in clusters[seen]]
        reasons[seen] = REASON_SEEN
    names = {s: cluster_name(s) for s in set(survivor_ids.tolist())}
    decisions = pa.table({
        "key": pa.array(keys, pa.int64()),
        "dup_cluster": pa.array([names[s] for s in survivor_ids], pa.string()),
        "dup_survivor": pa.array(survivor_ids.tolist(), pa.string()),
        "reason": pa.array(reasons.tolist(), pa.string()),
    })
    scatter(decisions, _part_of(keys), plan.parts,
            lambda p: plan.work / "decisions" / f"part-{p:05d}" / f"from-{partition:05d}.parquet")
    sizes = np.unique(decisions.column("dup_cluster").to_numpy(zero_copy_only=False), return_counts=True)[1]
    return {"clusters": len(sizes), "largest": int(sizes.max(initial=0)), "size_counts": _size_counts(sizes),
            "sample": _sample_clusters(decisions, plan.config.sample_clusters)}


# ---------------------------------------------------------------------------------------------
# 5. write


def write_part(item: tuple[int, str, list[int]], plan: Plan) -> dict[str, Any]:
    """Write `kept/` and `removed/` for one input part (its decisions from `work/decisions/`), its
    survivors into `index/`, and return the counts and the sampled documents that live in it."""
    part, path, sample_keys = item
    files = io.list_parts(plan.work / "decisions" / f"part-{part:05d}")
    decisions = pa.concat_tables(storage.read_parquet(f) for f in files) if files else pa.table({
        "key": pa.array([], pa.int64()), "dup_cluster": pa.array([], pa.string()),
        "dup_survivor": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    table = storage.read_parquet(path)
    n = table.num_rows
    rows = _row_of(decisions.column("key").to_numpy())
    cluster = np.full(n, None, dtype=object)
    survivor = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)
    cluster[rows] = decisions.column("dup_cluster").to_pylist()
    survivor[rows] = decisions.column("dup_survivor").to_pylist()
    reason[rows] = decisions.column("reason").to_pylist()
    for name, values in (("dup_cluster", cluster), ("dup_survivor", survivor)):
        column = pa.array(values.tolist(), pa.string())
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, column)
        else:
            table = table.append_column(name, column)
    removed_mask = np.array([r is not None for r in reason], dtype=bool)
    kept = table.filter(pa.array(~removed_mask))
    removed = io.with_reason(table.filter(pa.array(removed_mask)), [r for r in reason if r is not None])
    if "reason" in kept.column_names:
        kept = kept.drop_columns(["reason"])
    caps = (plan.config.max_part_rows, plan.config.max_part_bytes)
    io.write_parts(kept, storage.location(plan.stage_dir) / io.KEPT, part, *caps)
    io.write_parts(removed, storage.location(plan.stage_dir) / io.REMOVED, part, *caps)
    _index_survivors(part, np.flatnonzero(~removed_mask), table.column("id"), plan)
    counts: dict[str, int] = {}
    for r in reason[removed_mask]:
        counts[r] = counts.get(r, 0) + 1
    texts = table.column("text")
    urls = table.column("url") if "url" in table.column_names else pa.nulls(n, pa.string())
    samples = {}
    for key in sample_keys:
        row = int(_row_of(np.int64(key)))
        text = texts[row].as_py() or ""
        samples[int(key)] = {"id": table.column("id")[row].as_py(), "url": urls[row].as_py(),
                             "head": text[:HEAD_CHARS], "chars": len(text), "reason": reason[row]}
    return {"removed_by_reason": counts, "samples": samples}


def _index_survivors(part: int, rows: np.ndarray, ids: pa.ChunkedArray, plan: Plan) -> None:
    """Append the kept documents' hashes to `index/bucket-B/batch-NNNN-part-PPPPP.parquet`."""
    docs = storage.read_parquet(plan.work / "docs" / io.part_name(part))
    band_ids, hashes, doc_rows = [], [], []
    if plan.config.exact:
        band_ids.append(np.full(len(rows), EXACT_BAND, np.int16))
        hashes.append(docs.column("exact").to_numpy()[rows])
        doc_rows.append(rows)
    if plan.config.url:
        url = docs.column("url").to_numpy()[rows]
        band_ids.append(np.full(int((url != 0).sum()), URL_BAND, np.int16))
        hashes.append(url[url != 0])
        doc_rows.append(rows[url != 0])
    bands_file = plan.work / "bands" / f"part-{part:05d}.npy"
    if plan.config.near and storage.is_published(bands_file):
        bands = storage.load_array(bands_file)[rows]
        band_ids.append(np.tile(np.arange(plan.bands, dtype=np.int16), len(rows)))
        hashes.append(bands.reshape(-1))
        doc_rows.append(np.repeat(rows, plan.bands))
    if not hashes:
        return
    band, hashes, doc_rows = np.concatenate(band_ids), np.concatenate(hashes), np.concatenate(doc_rows)
    id_values = ids.take(pa.array(doc_rows)) if len(doc_rows) else pa.array([], pa.string())
    bucket = hashes % np.uint64(plan.buckets)
    for b in np.unique(bucket):
        mask = bucket == b
        io.write_parquet_atomic(
            pa.table({"band": band[mask], "hash": hashes[mask], "id": id_values.filter(pa.array(mask))}),
            storage.location(plan.stage_dir) / "index" / f"bucket-{int(b):05d}" / f"batch-{plan.batch:04d}-{io.part_name(part)}",
        )


# ---------------------------------------------------------------------------------------------
# The stage


def _open_earlier_index(config: DedupConfig, ctx: StageContext, settings: dict[str, Any]) -> tuple[Path | None, dict]:
    if not config.index_from:
        return None, {}
    folder = Path(os.path.expanduser(config.index_from))
    folder = folder if folder.is_absolute() else ctx.workflow_dir / folder
    index = folder / "index" if (folder / "index" / "meta.json").exists() else folder
    meta = io.read_json(index / "meta.json")
    if meta is None:
        raise ValueError(f"dedup: index_from {config.index_from!r}: no dedup index at {index} (expected "
                         "index/meta.json; point it at an earlier run's dedup stage folder)")
    for key in INDEX_KEYS:
        if meta["settings"].get(key) != settings[key]:
            raise ValueError(f"dedup: index_from {config.index_from!r}: the index was built with {key} = "
                             f"{meta['settings'].get(key)!r} but this stage uses {settings[key]!r}; they must match")
    return index, meta


def _link_earlier_index(earlier: Path, target: Path) -> None:
    for file in earlier.glob("bucket-*/*.parquet"):
        destination = target / file.parent.name / file.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, destination)
        except OSError:
            shutil.copy2(file, destination)


def _unique_pairs(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`(n, 2)` int64 array of the distinct `(u, v)` pairs, sorted."""
    if len(u) == 0:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([u, v], axis=1).astype(np.int64), axis=0)


def _size_counts(sizes: np.ndarray) -> np.ndarray:
    """How many clusters fall in each bin `[CLUSTER_SIZE_EDGES[i], CLUSTER_SIZE_EDGES[i + 1])`, the last open."""
    bins = np.searchsorted(CLUSTER_SIZE_EDGES, sizes, side="right") - 1
    return np.bincount(bins[bins >= 0], minlength=len(CLUSTER_SIZE_EDGES))


@custom_stage("dedup", DedupConfig, produces_documents=True, object_storage=True)
def dedup(ctx: StageContext) -> StageResult:
    """Remove exact and near duplicates across all input parts; see the module docstring. The
    client only hands out work and adds up counts: every step's data stays in files."""
    config: DedupConfig = ctx.config
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    parts = [str(p) for p in ctx.input_parts()]
    bands, rows = config.bands_rows()
    settings = {"num_perm": config.num_perm, "scheme": config.scheme, "bands": bands, "rows": rows, "seed": config.seed,
                "shingle": config.shingle, "ngram": config.ngram, "normalise": config.normalise.model_dump(),
                "url": config.url}
    earlier, meta = _open_earlier_index(config, ctx, settings)
    buckets = meta.get("buckets") or config.shuffle_partitions or max(1, min(len(parts), 256))
    plan = Plan(config, bands, rows, buckets, len(parts), str(ctx.stage_dir), str(earlier) if earlier else None,
                batch=meta.get("batches", 0) + 1)
    for folder in ("work", "index", io.KEPT, io.REMOVED):
        storage.remove_tree(ctx.stage_dir / folder)
    for folder in ("docs", "shuffle", "signatures", "shingles", "bands"):
        storage.make_dirs(plan.work / folder)

    def step(name: str, fn: Any, items: Any) -> list[Any]:
        clock = time.perf_counter()
        results = ctx.map(functools.partial(fn, plan=plan), items, f"{ctx.name}: {name}")
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - clock
        return results

    signed = step("sign", sign_part, list(enumerate(parts)))
    grouped = step("group", group_bucket, range(buckets))
    verified = step("verify", verify_partition, range(buckets))
    clock = time.perf_counter()
    graph = label_components(plan.work / "graph", buckets, ctx.map, f"{ctx.name}: components")
    ctx.map(functools.partial(scatter_members, plan=plan, labels_dir=str(graph.labels_dir)), range(buckets),
            f"{ctx.name}: members")
    timings["components"] = time.perf_counter() - clock
    step("survivors", gather_facts, range(len(parts)))
    chosen = step("survivors", choose_survivors, range(buckets))
    sample = sorted((c for r in chosen for c in r["sample"]), key=lambda c: (-c["size"], c["cluster"]))
    sample = sample[: config.sample_clusters]
    sample_keys = [k for c in sample for k in c["keys"]]
    written = step("write", write_part, [(p, path, [k for k in sample_keys if k >> 32 == p])
                                         for p, path in enumerate(parts)])
    clock = time.perf_counter()
    io.write_json_atomic({"settings": settings, "buckets": buckets, "batches": plan.batch},
                         ctx.stage_dir / "index" / "meta.json")
    if earlier is not None:
        _link_earlier_index(earlier, ctx.stage_dir / "index")
    storage.remove_tree(plan.work)
    timings["write"] += time.perf_counter() - clock

    n_in = sum(s["rows"] for s in signed)
    removed_by_reason: dict[str, int] = {}
    samples: dict[int, dict] = {}
    for w in written:
        for reason, count in w["removed_by_reason"].items():
            removed_by_reason[reason] = removed_by_reason.get(reason, 0) + count
        samples.update(w["samples"])
    removed = sum(removed_by_reason.values())
    largest = max((r["largest"] for r in chosen), default=0)
    edges = {name: sum(v[name] for v in verified) for name in ("exact", "candidates", "verified")}
    stats = {
        "lsh": {"num_perm": config.num_perm, "scheme": config.scheme, "bands": bands, "rows": rows, "threshold": config.threshold,
                "shingle": config.shingle, "ngram": config.ngram, "verify": config.verify,
                "buckets": buckets, "batch": plan.batch, "index_from": plan.earlier_index},
        "duplicate_rate": removed / n_in if n_in else 0.0,
        "removed_by_reason": removed_by_reason,
        "documents_without_shingles": sum(s["no_shingles"] for s in signed),
        "edges": {**edges, "rejected": edges["candidates"] - edges["verified"],
                  "seen_before": sum(g["seen"] for g in grouped)},
        "components": {"rounds": graph.rounds, "nodes": graph.nodes, "label_changes": graph.changed_per_round},
        "clusters": sum(r["clusters"] for r in chosen),
        "largest_cluster": largest,
        "cluster_size_histogram": {"edges": CLUSTER_SIZE_EDGES + [max(CLUSTER_SIZE_EDGES[-1] + 1, largest + 1)],
                                   "counts": np.sum([r["size_counts"] for r in chosen], axis=0).tolist()},
        "sample_clusters": [
            {"cluster": c["cluster"], "size": c["size"], "survivor": c["survivor"],
             "documents": [samples[k] for k in c["keys"] if k in samples]}
            for c in sample
        ],
        "timings_s": {k: round(t, 4) for k, t in timings.items()},
    }
    return StageResult(counts={"in": n_in, "kept": n_in - removed, "removed": removed}, stats=stats)


def _sample_clusters(decisions: pa.Table, limit: int) -> list[dict[str, Any]]:
    """The largest clusters (ties by name), with up to SAMPLE_MEMBERS member keys each, survivor first."""
    if limit == 0 or decisions.num_rows == 0:
        return []
    by_cluster: dict[str, dict[str, Any]] = {}
    for key, cluster, survivor, reason in zip(decisions.column("key").to_pylist(),
                                              decisions.column("dup_cluster").to_pylist(),
                                              decisions.column("dup_survivor").to_pylist(),
                                              decisions.column("reason").to_pylist()):
        entry = by_cluster.setdefault(cluster, {"cluster": cluster, "survivor": survivor, "size": 0, "keys": []})
        entry["size"] += 1
        if reason is None:
            entry["keys"].insert(0, key)
        else:
            entry["keys"].append(key)
    chosen = sorted(by_cluster.values(), key=lambda c: (-c["size"], c["cluster"]))[:limit]
    for c in chosen:
        c["keys"] = c["keys"][:SAMPLE_MEMBERS]
    return chosen
