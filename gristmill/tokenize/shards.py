"""Token shards: the file format between `pack` and `train` (DESIGN.md, "Token shards").

A shard is a 256 x int32 little-endian header followed by the tokens, exactly as llm.c and
modded-nanogpt write them, so their loaders read gristmill shards unchanged:
header[0] = magic, header[1] = version, header[2] = token count.
Magic 20240520 / version 1 holds uint16 tokens (vocabularies up to 65,536);
magic 20240801 / version 7 holds uint32 tokens (larger vocabularies).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
UINT16_MAGIC, UINT16_VERSION = 20240520, 1
UINT32_MAGIC, UINT32_VERSION = 20240801, 7
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _header_for(dtype: np.dtype, n_tokens: int) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    if dtype == np.dtype("<u2"):
        header[0], header[1] = UINT16_MAGIC, UINT16_VERSION
    elif dtype == np.dtype("<u4"):
        header[0], header[1] = UINT32_MAGIC, UINT32_VERSION
    else:
        raise ValueError(f"token shards hold uint16 or uint32 tokens, not {dtype}")
    header[2] = n_tokens
    return header


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> str:
    """Write one shard atomically and return its sha256 (hex)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** (8 * dtype.itemsize)):
        raise ValueError(f"{path}: token ids out of range for {dtype}")
    payload = _header_for(dtype, int(tokens.size)).tobytes() + tokens.astype(dtype, copy=False).tobytes()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """The token dtype and count of a shard, checking its magic and size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size < HEADER_INTS:
        raise ValueError(f"{path}: shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, n_tokens = int(header[0]), int(header[1]), int(header[2])
    if (magic, version) == (UINT16_MAGIC, UINT16_VERSION):
        dtype = np.dtype("<u2")
    elif (magic, version) == (UINT32_MAGIC, UINT32_VERSION):
        dtype = np.dtype("<u4")
    else:
        raise ValueError(f"{path}: unknown shard magic/version {magic}/{version}")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: {path.stat().st_size} bytes on disk, header promises {expected}")
    return dtype, n_tokens


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of a shard as a read-only memmap (no parsing, no copy)."""
    dtype, n_tokens = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_meta(folder: str | os.PathLike, meta: dict) -> Path:
    """Write `meta.json` beside the shards, atomically (it is the last file `pack` writes)."""
    path = Path(folder) / META_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_meta(folder: str | os.PathLike) -> dict:
    """The `meta.json` of a pack folder: tokenizer, vocab_size, dtype, eos_id, counts, shards."""
    path = Path(folder) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no meta.json; is {folder} a finished pack folder?") from None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()
