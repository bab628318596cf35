"""Documents for tokenizer work: streamed from Parquet parts (or text / JSON-lines files), split
deterministically by document id, and cut to a sample budget.

The split is a hash of (seed, document id): the same document lands on the same side in every run
and on every worker, so a held-out document is never trained on and a validation document never
reaches the training shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gristmill.pipeline import io

BATCH_ROWS = 1024


def split_fraction(ids: list[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per document id, fixed by (seed, id)."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, doc_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2**64
    return out


def in_split(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """True for the documents in the `fraction`-sized side (held out / validation)."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    return split_fraction(ids, seed) < fraction


def read_documents(path: Path) -> Iterator[pa.Table]:
    """`id`, `text`, `lang` batches of one Parquet, JSON-lines or text file (a text file is one
    document); a file without ids gets stable ones from its path and row."""
    if path.suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        names = pf.schema_arrow.names
        if "text" not in names:
            raise ValueError(f"{path}: no `text` column (columns: {names})")
        columns = [c for c in ("id", "text", "lang") if c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            table = pa.Table.from_batches([batch])
            yield _with_ids_and_lang(table, path, row)
            row += table.num_rows
    elif path.suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a `text` key ({err})") from None
            records.append({"text": text, "lang": record.get("lang"), "id": record.get("id")})
        table = pa.Table.from_pylist(records, schema=pa.schema([("text", pa.string()), ("lang", pa.string()),
                                                                 ("id", pa.string())]))
        if any(r["id"] is None for r in records):
            table = table.drop_columns(["id"])
        yield _with_ids_and_lang(table, path, 0)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from None
        yield _with_ids_and_lang(pa.table({"text": [text]}), path, 0)


def _with_ids_and_lang(table: pa.Table, path: Path, first_row: int) -> pa.Table:
    if "id" not in table.column_names:
        ids = [io.document_id(str(path), first_row + i) for i in range(table.num_rows)]
        table = table.append_column("id", pa.array(ids, pa.string()))
    if "lang" not in table.column_names:
        table = table.append_column("lang", pa.nulls(table.num_rows, pa.string()))
    return table.select(["id", "text", "lang"])


@dataclass
class Sample:
    """Which side of the split to read and how much of it."""

    side: str = "train"  # "train": the documents outside the split; "split": those inside it
    fraction: float = 0.0
    seed: int = 0
    max_bytes: int | None = None
    max_docs: int | None = None


def iter_documents(paths: list[Path], sample: Sample) -> Iterator[pa.Table]:
    """`id`, `text`, `lang` tables of the chosen side, in input order, stopping at the budget
    (UTF-8 bytes of text, documents). Memory is bounded by one batch."""
    if sample.side not in ("train", "split"):
        raise ValueError(f"sample side must be 'train' or 'split', not {sample.side!r}")
    n_bytes = n_docs = 0
    for path in paths:
        for table in read_documents(Path(path)):
            table = table.filter(pc.is_valid(table["text"]))
            inside = in_split(table["id"].to_pylist(), sample.fraction, sample.seed)
            table = table.filter(pa.array(inside if sample.side == "split" else ~inside))
            sizes = pc.binary_length(pc.cast(table["text"], pa.binary())).to_numpy(zero_copy_only=False)
            keep = len(sizes)
            if sample.max_docs is not None:
                keep = min(keep, sample.max_docs - n_docs)
            if sample.max_bytes is not None:
                within = np.cumsum(sizes[:keep]) + n_bytes <= sample.max_bytes
                keep = int(within.sum())
            if keep < table.num_rows:
                table = table.slice(0, keep)
            if table.num_rows:
                n_docs += table.num_rows
                n_bytes += int(sizes[:keep].sum())
                yield table
            if keep < len(sizes):
                return


def iter_texts(paths: list[Path], sample: Sample, counter: dict[str, int] | None = None) -> Iterator[list[str]]:
    """Batches of texts for `Tokenizer.train_from_iterator`; `counter` gets `docs` and `bytes`."""
    for table in iter_documents(paths, sample):
        if counter is not None:
            counter["docs"] = counter.get("docs", 0) + table.num_rows
            counter["bytes"] = counter.get("bytes", 0) + int(
                pc.sum(pc.binary_length(pc.cast(table["text"], pa.binary()))).as_py() or 0
            )
        yield table["text"].to_pylist()


def resolve_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named by paths, globs or folders (a folder means its .parquet/.jsonl/.txt/.md files)."""
    files: list[Path] = []
    for item in inputs:
        matched = io.expand_paths(str(item))
        if not matched:
            raise FileNotFoundError(f"{item}: no such file, folder or glob match")
        if Path(item).is_dir():
            matched = [p for p in matched if p.suffix in (".parquet", ".jsonl", ".txt", ".md")]
        files.extend(p for p in matched if not p.name.startswith("."))
    return files
