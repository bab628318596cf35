"""Encode documents into fixed-size token shards (DESIGN.md, "Token shards") plus `meta.json`.

Two phases, both resumable:
1. encode (parallel: one task per unit of at most `unit_docs` documents of one input part, mapped
   over every Dask worker): each document's ids followed by EOS, split into train / validation by a
   hash of (seed, document id), written to `_tokens/unit-NNNNN.{train,val}.bin` with a
   `unit-NNNNN.json` record written last. A unit with its record is never encoded again. Large
   parts are cut into several units so that a few big parts still keep every worker busy.
2. shard (in order): the train and val streams of the units, in input order, are cut into
   `shard_tokens`-sized `train_000000.bin` / `val_000000.bin` files (the last one shorter). The
   streams, and so the shards, do not depend on the unit size or on how many workers encoded them.
   A shard on disk is complete (written atomically) and is kept; encoded units are deleted once
   every shard covering them exists.

The tokenizer folder is copied to `<pack>/tokenizer/` so the shards travel with what decodes them.
Literal special-token text inside a document (e.g. "<|endoftext|>" in a page) is encoded as text:
only `pack` itself puts EOS between documents.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from gristmill.pipeline import io
from gristmill.tokenize import shards
from gristmill.tokenize.corpus import in_split, read_documents
from gristmill.tokenize.recipes import objective_token_ids
from gristmill.tokenize.tiktoken_export import NotExportable, to_tiktoken
from gristmill.tokenize.train import TOKENIZER_FILE, eos_token_of, load_tokenizer

TOKENS_DIR = "_tokens"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "spec.json")
SPLITS = ("train", "val")
ENCODE_BATCH_DOCS = 512
UNIT_DOCS = 8192  # documents per encode task: small enough to spread a big part over the workers

Encode = Callable[[list[str]], list[np.ndarray]]


def _tokenizers_encoder(tokenizer: Tokenizer) -> Encode:
    tokenizer.encode_special_tokens = True  # special-token text in a page is text, not a control token

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    return encode


def _tiktoken_encoder(tokenizer: Tokenizer, threads: int) -> Encode:
    encoding = to_tiktoken(tokenizer)
    one = functools.partial(encoding.encode_to_numpy, allowed_special=set(), disallowed_special=())
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def encode_all(texts: list[str]) -> list[np.ndarray]:
        return [one(t) for t in texts]

    def encode(texts: list[str]) -> list[np.ndarray]:
        if pool is None or len(texts) < 2 * threads:
            return encode_all(texts)
        step = -(-len(texts) // threads)  # one contiguous chunk per thread: few futures, order kept
        chunks = pool.map(encode_all, [texts[i : i + step] for i in range(0, len(texts), step)])
        return [ids for chunk in chunks for ids in chunk]

    return encode


def load_encoder(tokenizer_file: str, engine: str, threads: int = 1) -> Encode:
    """`texts -> [uint32 ids]` with the chosen engine; cached per process by the tokenizer's content,
    so a Dask worker builds it (and its tiktoken export) once for every unit and every pack run."""
    return _cached_encoder(Path(tokenizer_file).read_text(encoding="utf-8"), engine, threads)


@functools.lru_cache(maxsize=4)
def _cached_encoder(tokenizer_json: str, engine: str, threads: int) -> Encode:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    if engine == "tiktoken":
        return _tiktoken_encoder(tokenizer, threads)
    if engine == "tokenizers":
        return _tokenizers_encoder(tokenizer)
    raise ValueError(f"engine must be 'tiktoken' or 'tokenizers', not {engine!r}")


def choose_engine(tokenizer_file: str, sample_texts: list[str], requested: str) -> tuple[str, dict]:
    """The engine to encode with and the evidence: tiktoken only when it exports and gives the same
    ids as `tokenizers` on every sample text. `requested`: auto, tiktoken or tokenizers."""
    if requested == "tokenizers":
        return "tokenizers", {"reason": "engine: tokenizers was requested"}
    try:
        fast = load_encoder(tokenizer_file, "tiktoken")
    except NotExportable as why:
        if requested == "tiktoken":
            raise ValueError(f"{tokenizer_file}: engine tiktoken requested but not possible: {why}") from None
        return "tokenizers", {"reason": f"not exportable to tiktoken: {why}"}
    reference = load_encoder(tokenizer_file, "tokenizers")(sample_texts)
    for i, (a, b) in enumerate(zip(reference, fast(sample_texts))):
        if not np.array_equal(a, b):
            reason = f"tiktoken ids differ from tokenizers on sample document {i}"
            if requested == "tiktoken":
                raise ValueError(f"{tokenizer_file}: engine tiktoken requested but {reason}")
            return "tokenizers", {"reason": reason, "checked_docs": i + 1}
    n_tokens = int(sum(len(a) for a in reference))
    return "tiktoken", {"reason": "identical ids on the sample", "checked_docs": len(sample_texts),
                        "checked_tokens": n_tokens}


def encode_units(parts: list[Path], unit_docs: int = UNIT_DOCS) -> list[tuple[str, int, int | None]]:
    """`(file, first row, end row)` work units in input order: Parquet parts cut into runs of at
    most `unit_docs` rows; any other file (JSON lines, text) is one unit (`end` None: to its end)."""
    units: list[tuple[str, int, int | None]] = []
    for part in parts:
        if Path(part).suffix != ".parquet":
            units.append((str(part), 0, None))
            continue
        rows = pq.ParquetFile(part).metadata.num_rows
        units += [(str(part), start, min(start + unit_docs, rows)) for start in range(0, max(rows, 1), unit_docs)]
    return units


def _read_unit(path: str, start: int, end: int | None) -> pa.Table:
    """The `id`, `text` rows `[start, end)` of one input file."""
    table = pa.concat_tables(read_documents(Path(path)))
    return table.slice(start, (end if end is not None else table.num_rows) - start)


def encode_part(
    item: tuple[int, tuple[str, int, int | None]],
    tokens_dir: str,
    tokenizer_file: str,
    engine: str,
    eos_id: int,
    dtype: str,
    val_fraction: float,
    seed: int,
    threads: int = 1,
) -> dict:
    """Encode one unit into `_tokens/` (train and val streams, EOS after every document) and
    return its record; a unit whose record exists is not encoded again."""
    index, (part, start, end) = item
    folder = Path(tokens_dir)
    record_path = folder / f"unit-{index:05d}.json"
    done = io.read_json(record_path)
    if done is not None:
        return done
    started = time.perf_counter()
    encode = load_encoder(tokenizer_file, engine, threads)
    table = _read_unit(part, start, end)
    texts = table["text"].to_pylist()
    ids = table["id"].to_pylist()
    usable = [i for i, t in enumerate(texts) if t]
    is_val = in_split([ids[i] for i in usable], val_fraction, seed)
    record = {"part": str(part), "rows": [start, start + table.num_rows], "docs": {}, "tokens": {},
              "empty_docs": len(texts) - len(usable)}
    eos = np.array([eos_id], dtype=dtype)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        chosen = [texts[i] for i, m in zip(usable, mask) if m]
        pieces: list[np.ndarray] = []
        for batch in range(0, len(chosen), ENCODE_BATCH_DOCS):
            for doc_ids in encode(chosen[batch : batch + ENCODE_BATCH_DOCS]):
                pieces += [doc_ids.astype(dtype, copy=False), eos]
        tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        io.write_bytes_atomic(tokens.tobytes(), folder / f"unit-{index:05d}.{split}.bin")
        record["docs"][split] = len(chosen)
        record["tokens"][split] = int(tokens.size)
    record["seconds"] = round(time.perf_counter() - started, 4)
    io.write_json_atomic(record, record_path)
    return record


def write_split_shards(
    split: str, records: list[dict], tokens_dir: Path, out_dir: Path, shard_tokens: int, dtype: np.dtype
) -> list[dict]:
    """Cut one split's token stream (units in order) into shards; shards already on disk are kept."""
    lengths = np.array([r["tokens"][split] for r in records], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    written = []
    for k in range(math.ceil(total / shard_tokens)):
        lo, hi = k * shard_tokens, min((k + 1) * shard_tokens, total)
        path = out_dir / f"{split}_{k:06d}.bin"
        if path.exists():
            _, n = shards.read_header(path)
            if n != hi - lo:
                raise ValueError(f"{path}: holds {n} tokens, expected {hi - lo}; run the stage with --force")
            sha = shards.file_sha256(path)
        else:
            pieces = []
            for i in np.nonzero((starts < hi) & (ends > lo))[0]:
                source = tokens_dir / f"unit-{i:05d}.{split}.bin"
                if not source.exists():
                    raise FileNotFoundError(f"{source}: encoded unit missing for {path.name}; run the stage with --force")
                first = max(lo, starts[i]) - starts[i]
                count = min(hi, ends[i]) - max(lo, starts[i])
                pieces.append(np.fromfile(source, dtype=dtype, count=int(count), offset=int(first) * dtype.itemsize))
            sha = shards.write_shard(path, np.concatenate(pieces), dtype)
            for i in np.nonzero(ends <= hi)[0]:
                (tokens_dir / f"unit-{i:05d}.{split}.bin").unlink(missing_ok=True)
        written.append({"file": path.name, "split": split, "tokens": hi - lo, "sha256": sha})
    return written


def copy_tokenizer(source: Path, out_dir: Path) -> Path:
    """Copy a tokenizer folder (or a lone tokenizer.json and its neighbours) into the pack folder."""
    folder = source if source.is_dir() else source.parent
    target = out_dir / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = source if (name == TOKENIZER_FILE and source.is_file()) else folder / name
        if src.is_file():
            io.write_bytes_atomic(src.read_bytes(), target / name)
    return target / TOKENIZER_FILE


def sample_texts(parts: list[Path], n_docs: int) -> list[str]:
    """The first `n_docs` non-empty texts of the inputs (for the engine check)."""
    texts: list[str] = []
    for part in parts:
        for table in read_documents(Path(part)):
            texts += [t for t in table["text"].to_pylist() if t][: n_docs - len(texts)]
            if len(texts) >= n_docs:
                return texts
    return texts


def pack(
    parts: list[Path],
    out_dir: Path,
    tokenizer: Path,
    mapper: Callable[[Callable, list, str], list],
    *,
    engine: str = "auto",
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    verify_docs: int = 64,
    eos_token: str | None = None,
    threads: int = 2,
    unit_docs: int = UNIT_DOCS,
) -> dict:
    """Encode `parts` into shards in `out_dir` and return the meta.json record. `mapper(fn, items,
    description)` runs the per-unit encoding (Dask's `ctx.map` over every worker, or a plain
    loop); `threads` > 1 adds tiktoken threads inside each task (for a single process)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = io.read_json(out_dir / shards.META_FILE)
    if previous is not None and all((out_dir / s["file"]).exists() for s in previous["shards"]):
        return previous  # finished before; only the run's bookkeeping was missing
    if not parts:
        raise ValueError("pack: no input documents (no kept Parquet parts upstream)")
    tokenizer_file = copy_tokenizer(Path(tokenizer), out_dir)
    hf = load_tokenizer(tokenizer_file)
    eos = eos_token or eos_token_of(tokenizer)
    if eos is None:
        raise ValueError(f"{tokenizer}: no EOS token recorded in tokenizer_config.json; set `eos_token`")
    eos_id = hf.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"{tokenizer}: eos_token {eos!r} is not in the vocabulary")
    vocab_size = hf.get_vocab_size(with_added_tokens=True)
    dtype = shards.token_dtype(vocab_size)
    chosen, evidence = choose_engine(str(tokenizer_file), sample_texts(parts, verify_docs), engine)

    started = time.perf_counter()
    tokens_dir = out_dir / TOKENS_DIR
    tokens_dir.mkdir(exist_ok=True)
    task = functools.partial(
        encode_part, tokens_dir=str(tokens_dir), tokenizer_file=str(tokenizer_file), engine=chosen,
        eos_id=eos_id, dtype=dtype.str, val_fraction=val_fraction, seed=seed, threads=threads,
    )
    records = mapper(task, list(enumerate(encode_units(parts, unit_docs))), "encode")
    shard_list = [
        shard
        for split in SPLITS
        for shard in write_split_shards(split, records, tokens_dir, out_dir, shard_tokens, dtype)
    ]
    seconds = time.perf_counter() - started
    tokens = {split: sum(r["tokens"][split] for r in records) for split in SPLITS}
    meta = {
        "tokenizer": f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        "tokenizer_source": str(Path(tokenizer).resolve()),
        "vocab_size": vocab_size,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "eos_token": eos,
        "eos_id": eos_id,
        **objective_token_ids(hf),
        "engine": chosen,
        "engine_check": evidence,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "encode_units": len(records),
        "documents": {split: sum(r["docs"][split] for r in records) for split in SPLITS},
        "empty_documents": sum(r["empty_docs"] for r in records),
        "tokens": tokens,
        "encode_seconds": round(seconds, 3),
        "tokens_per_s": round(sum(tokens.values()) / seconds, 1) if seconds > 0 else 0.0,
        "shards": shard_list,
    }
    shards.write_meta(out_dir, meta)
    shutil.rmtree(tokens_dir, ignore_errors=True)
    return meta


def serial_map(fn: Callable, items: list, description: str = "") -> list:
    """The mapper `pack` uses outside a workflow: in order, in this process."""
    return [fn(item) for item in items]
