"""The `dedup` stage: exact and MinHash-LSH near-duplicate removal across the whole dataset.

Map -> shuffle -> reduce, with hash-partitioned Parquet files in the stage folder between steps,
so no process ever holds more than one partition's signatures:

1. sign (one task per input part): normalise, exact hash, MinHash signature, LSH band hashes;
   write rows `(band, hash, key)` to `work/shuffle/bucket-B/part-P.parquet` by `hash % buckets`
   (band -1 is the exact-text hash, band -2 the URL hash). `key` = part << 32 | row.
2. group (one task per bucket): documents sharing a `(band, hash)` become candidate edges (each
   to the smallest key of its group); rows matching an earlier run's index become `seen` pairs.
3. verify (one task per part): candidate edges from bands are checked by true Jaccard of the
   shingles (`verify: jaccard`, shingles saved by step 1) or the signature estimate (`signature`);
   exact/URL edges need not.
4. components: min-label propagation over the accepted edges; one survivor per cluster
   (`survivor: earliest_id` or `longest`), chosen from document facts, never from partitioning.
5. write (one task per part): `kept/` and `removed/` part for part, with `dup_cluster` and
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
    buckets: int
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
    _scatter(plan, part, np.concatenate(band_ids) if band_ids else np.zeros(0, np.int16),
             np.concatenate(hashes) if hashes else np.zeros(0, np.uint64),
             np.concatenate(row_keys) if row_keys else np.zeros(0, np.int64))
    return {"part": part, "rows": n, "no_shingles": no_shingles, "seconds": time.perf_counter() - started}


def _scatter(plan: Plan, part: int, band: np.ndarray, hashes: np.ndarray, keys: np.ndarray) -> None:
    bucket = (hashes % np.uint64(plan.buckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    bucket, band, hashes, keys = bucket[order], band[order], hashes[order], keys[order]
    bounds = np.searchsorted(bucket, np.arange(plan.buckets + 1))
    for b in range(plan.buckets):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            io.write_parquet_atomic(
                pa.table({"band": band[lo:hi], "hash": hashes[lo:hi], "key": keys[lo:hi]}),
                plan.work / "shuffle" / f"bucket-{b:05d}" / io.part_name(part),
            )


# ---------------------------------------------------------------------------------------------
# 2. group


def group_bucket(bucket: int, plan: Plan) -> dict[str, np.ndarray]:
    """Candidate edges `(anchor, key, needs_verify)` and `seen` pairs `(key, earlier id)` of one bucket."""
    files = io.list_parts(plan.work / "shuffle" / f"bucket-{bucket:05d}")
    empty = {"u": np.zeros(0, np.int64), "v": np.zeros(0, np.int64), "verify": np.zeros(0, bool),
             "seen_key": np.zeros(0, np.int64), "seen_id": np.zeros(0, object)}
    if not files:
        return empty
    rows = pa.concat_tables(storage.read_parquet(f) for f in files)
    groups = rows.group_by(["band", "hash"]).aggregate([("key", "min"), ("key", "count")])
    groups = groups.filter(pc.greater(groups.column("key_count"), 1)).drop_columns(["key_count"])
    members = rows.join(groups, keys=["band", "hash"], join_type="inner")
    members = members.filter(pc.not_equal(members.column("key"), members.column("key_min")))
    result = dict(empty)
    result["u"] = members.column("key_min").to_numpy()
    result["v"] = members.column("key").to_numpy()
    result["verify"] = members.column("band").to_numpy() >= 0
    if plan.earlier_index:
        index_files = io.list_parts(storage.location(plan.earlier_index) / f"bucket-{bucket:05d}")
        if index_files:
            index = pa.concat_tables(storage.read_parquet(f) for f in index_files)
            earliest = index.group_by(["band", "hash"]).aggregate([("id", "min")])
            seen = rows.join(earliest, keys=["band", "hash"], join_type="inner")
            result["seen_key"] = seen.column("key").to_numpy()
            result["seen_id"] = np.asarray(seen.column("id_min").to_pylist(), dtype=object)
    return result


# ---------------------------------------------------------------------------------------------
# 3. verify


def verify_edges(item: tuple[int, np.ndarray, np.ndarray], plan: Plan) -> np.ndarray:
    """For edges whose first end lies in part `item[0]`: which are similar enough to keep."""
    _part, u, v = item
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
        lengths = offsets[rows + 1] - offsets[rows]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pieces.append(np.asarray(hashes[np.repeat(offsets[rows], lengths) + within]))
        counts.append(lengths)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint64),
            np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# 4. components and survivors


def connected_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(nodes, label)` for an undirected edge list: label = the smallest node of its component.

    Min-label propagation with pointer jumping, vectorised over all edges; memory is linear in
    the number of edges (documents without duplicates never appear).
    """
    nodes, inverse = np.unique(np.concatenate([u, v]), return_inverse=True)
    a, b = inverse[: len(u)], inverse[len(u) :]
    label = np.arange(len(nodes))
    while True:
        lowest = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, lowest)
        np.minimum.at(new, b, lowest)
        new = new[new]
        if np.array_equal(new, label):
            return nodes, nodes[label]
        label = new


def cluster_name(survivor_id: str) -> str:
    """A short, stable cluster name derived from the survivor's id (same in every run)."""
    return hashlib.blake2b(survivor_id.encode(), digest_size=6).hexdigest()


def choose_survivors(nodes: np.ndarray, labels: np.ndarray, seen_ids: np.ndarray, plan: Plan) -> pa.Table:
    """One row per batch document in a cluster: key, cluster, survivor id, reason (null for the survivor).

    `nodes < 0` stand for documents of the earlier index (`seen_ids[-node - 1]`); a cluster that
    holds one is removed entirely (`dedup:seen_before`) in favour of the smallest earlier id.
    """
    facts = _document_facts(nodes[nodes >= 0], plan)
    batch = nodes >= 0
    keys, clusters = nodes[batch], labels[batch]
    ids = np.asarray(facts.column("id").to_pylist(), dtype=object)
    length = facts.column("length").to_numpy()
    exact = facts.column("exact").to_numpy()
    url = facts.column("url").to_numpy()
    # Earlier documents of each cluster: the smallest earlier id survives.
    earlier_of: dict[int, str] = {}
    for node, cluster in zip(nodes[~batch], labels[~batch]):
        earlier = seen_ids[-node - 1]
        if cluster not in earlier_of or earlier < earlier_of[cluster]:
            earlier_of[int(cluster)] = earlier
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
    return pa.table({
        "key": pa.array(keys, pa.int64()),
        "dup_cluster": pa.array([names[s] for s in survivor_ids], pa.string()),
        "dup_survivor": pa.array(survivor_ids.tolist(), pa.string()),
        "reason": pa.array(reasons.tolist(), pa.string()),
    })


def _document_facts(keys: np.ndarray, plan: Plan) -> pa.Table:
    """id, length, exact and URL hash of `keys` (sorted), from the sign step's per-part files."""
    pieces = []
    for p in np.unique(_part_of(keys)):
        table = storage.read_parquet(plan.work / "docs" / io.part_name(int(p)))
        pieces.append(table.take(pa.array(_row_of(keys[_part_of(keys) == p]))))
    if not pieces:
        return pa.table({"id": pa.array([], pa.string()), "length": pa.array([], pa.int64()),
                         "exact": pa.array([], pa.uint64()), "url": pa.array([], pa.uint64())})
    return pa.concat_tables(pieces)


# ---------------------------------------------------------------------------------------------
# 5. write


def write_part(item: tuple[int, str, pa.Table, list[int]], plan: Plan) -> dict[str, Any]:
    """Write `kept/` and `removed/` for one input part, its survivors into `index/`, and return
    the counts and the sampled documents that live in this part."""
    part, path, decisions, sample_keys = item
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
    stage_dir = storage.location(plan.stage_dir)
    io.write_parquet_atomic(kept, stage_dir / io.KEPT / io.part_name(part))
    io.write_parquet_atomic(removed, stage_dir / io.REMOVED / io.part_name(part))
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


def _cluster_size_histogram(sizes: np.ndarray) -> dict[str, Any]:
    edges = CLUSTER_SIZE_EDGES + [max(CLUSTER_SIZE_EDGES[-1] + 1, int(sizes.max(initial=0)) + 1)]
    counts, _ = np.histogram(sizes, bins=edges)
    return {"edges": edges, "counts": counts.tolist()}


@custom_stage("dedup", DedupConfig, produces_documents=True)
def dedup(ctx: StageContext) -> StageResult:
    """Remove exact and near duplicates across all input parts; see the module docstring."""
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
    plan = Plan(config, bands, rows, buckets, str(ctx.stage_dir), str(earlier) if earlier else None,
                batch=meta.get("batches", 0) + 1)
    for folder in ("work", "index", io.KEPT, io.REMOVED):
        storage.remove_tree(ctx.stage_dir / folder)
    for folder in ("docs", "shuffle", "signatures", "shingles", "bands"):
        storage.make_dirs(plan.work / folder)

    signed = ctx.map(functools.partial(sign_part, plan=plan), list(enumerate(parts)), f"{ctx.name}: sign")
    timings["sign"] = time.perf_counter() - clock
    clock = time.perf_counter()
    grouped = ctx.map(functools.partial(group_bucket, plan=plan), range(buckets), f"{ctx.name}: group")
    u = np.concatenate([g["u"] for g in grouped] + [np.zeros(0, np.int64)])
    v = np.concatenate([g["v"] for g in grouped] + [np.zeros(0, np.int64)])
    needs_verify = np.concatenate([g["verify"] for g in grouped] + [np.zeros(0, bool)])
    seen_key = np.concatenate([g["seen_key"] for g in grouped] + [np.zeros(0, np.int64)])
    seen_id = np.concatenate([g["seen_id"] for g in grouped] + [np.zeros(0, object)])
    timings["group"] = time.perf_counter() - clock

    clock = time.perf_counter()
    # An edge found by several bands is checked once; one found by an exact hash is never checked.
    exact_pairs = _unique_pairs(u[~needs_verify], v[~needs_verify])
    band_pairs = _unique_pairs(u[needs_verify], v[needs_verify])
    accepted = band_pairs
    if config.verify != "none" and len(band_pairs):
        owner = _part_of(band_pairs[:, 0])
        items = [(int(p), band_pairs[owner == p, 0], band_pairs[owner == p, 1]) for p in np.unique(owner)]
        verdicts = ctx.map(functools.partial(verify_edges, plan=plan), items, f"{ctx.name}: verify")
        keep = np.zeros(len(band_pairs), dtype=bool)
        for (p, _, _), verdict in zip(items, verdicts):
            keep[np.flatnonzero(owner == p)] = verdict
        accepted = band_pairs[keep]
    timings["verify"] = time.perf_counter() - clock

    clock = time.perf_counter()
    earlier_ids, earlier_index = np.unique(seen_id.astype(str), return_inverse=True) if len(seen_id) else (np.zeros(0, object), np.zeros(0, np.int64))
    edge_u = np.concatenate([exact_pairs[:, 0], accepted[:, 0], seen_key])
    edge_v = np.concatenate([exact_pairs[:, 1], accepted[:, 1], -(earlier_index.astype(np.int64) + 1)])
    nodes, labels = connected_components(edge_u.astype(np.int64), edge_v.astype(np.int64))
    decisions = choose_survivors(nodes, labels, earlier_ids.astype(object), plan)
    timings["components"] = time.perf_counter() - clock

    clock = time.perf_counter()
    decision_part = _part_of(decisions.column("key").to_numpy())
    sample = _sample_clusters(decisions, config.sample_clusters)
    sample_keys = [k for c in sample for k in c["keys"]]
    items = []
    for p, path in enumerate(parts):
        mine = decisions.filter(pa.array(decision_part == p))
        items.append((p, path, mine, [k for k in sample_keys if k >> 32 == p]))
    written = ctx.map(functools.partial(write_part, plan=plan), items, f"{ctx.name}: write")
    io.write_json_atomic({"settings": settings, "buckets": buckets, "batches": plan.batch},
                         ctx.stage_dir / "index" / "meta.json")
    if earlier is not None:
        _link_earlier_index(earlier, ctx.stage_dir / "index")
    storage.remove_tree(plan.work)
    timings["write"] = time.perf_counter() - clock

    n_in = sum(s["rows"] for s in signed)
    removed_by_reason: dict[str, int] = {}
    samples: dict[int, dict] = {}
    for w in written:
        for reason, count in w["removed_by_reason"].items():
            removed_by_reason[reason] = removed_by_reason.get(reason, 0) + count
        samples.update(w["samples"])
    removed = sum(removed_by_reason.values())
    sizes = np.unique(decisions.column("dup_cluster").to_numpy(zero_copy_only=False), return_counts=True)[1]
    stats = {
        "lsh": {"num_perm": config.num_perm, "scheme": config.scheme, "bands": bands, "rows": rows, "threshold": config.threshold,
                "shingle": config.shingle, "ngram": config.ngram, "verify": config.verify,
                "buckets": buckets, "batch": plan.batch, "index_from": plan.earlier_index},
        "duplicate_rate": removed / n_in if n_in else 0.0,
        "removed_by_reason": removed_by_reason,
        "documents_without_shingles": sum(s["no_shingles"] for s in signed),
        "edges": {"exact": int(len(exact_pairs)), "candidates": int(len(band_pairs)),
                  "verified": int(len(accepted)), "rejected": int(len(band_pairs) - len(accepted)),
                  "seen_before": int(len(seen_key))},
        "clusters": int(len(sizes)),
        "largest_cluster": int(sizes.max(initial=0)),
        "cluster_size_histogram": _cluster_size_histogram(sizes),
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
