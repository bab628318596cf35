"""Where inputs and run folders live, and how a file is published there.

A location is a plain path (a `pathlib.Path`, as always) or an fsspec URL (`s3://`, `gs://`,
`https://` read-only, `memory://` for tests), which becomes a `upath.UPath` with the same
`/`, `open`, `exists`, `glob` API. Credentials are the back-end's business (its environment
variables and config files); they never appear in a URL gristmill stores.

Publishing. On a local disk a file is written under a temporary name and renamed into place. Object
stores have no rename, so a remote file is written under its final name and then published by a
small marker object `<name>.published` (its size in bytes), written only after the upload completed:

1. the old marker, if any, is deleted first, so a rewrite is never trusted half way;
2. the object is uploaded; an exception while writing *aborts* the upload (`discard`), where
   fsspec's own `__exit__` would complete it and publish a truncated object;
3. the marker is written.

Readers and resume list markers, never bare objects, and check the object's size against its marker.
Objects without a marker (left by an aborted or killed attempt) are deleted by `remove_unpublished`
under the run lock.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.memory import MemoryFileSystem
from upath import UPath

MARKER_SUFFIX = ".published"
READ_ONLY_PROTOCOLS = ("http", "https")

Location = Path | UPath


def is_url(text: str) -> bool:
    """True for `scheme://...` other than `file://`: a location fsspec must open."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def location(where: str | os.PathLike) -> Location:
    """A local `Path` for a path or `file://` URL, a `UPath` for any other fsspec URL. Remote paths
    see fresh listings every time: other processes (Dask workers) write into the same folders."""
    if isinstance(where, UPath) and not isinstance(where, Path):
        return where
    text = os.fspath(where) if isinstance(where, Path) else str(where)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not is_url(text):
        return Path(os.path.expanduser(text))
    return UPath(text, use_listings_cache=False)


def is_remote(path: Location) -> bool:
    return not isinstance(path, Path)


def protocol(path: Location) -> str:
    return "file" if not is_remote(path) else path.protocol


def check_writable(path: Location) -> None:
    """Refuse a run folder on a read-only back-end (https) with a message naming it."""
    if protocol(path) in READ_ONLY_PROTOCOLS:
        raise ValueError(f"{path}: {protocol(path)}:// is read-only; a run folder needs local disk, s3://, gs:// ...")


def marker(path: Location) -> Location:
    return path.with_name(path.name + MARKER_SUFFIX)


@contextmanager
def publishing(path: Location) -> Iterator[IO[bytes]]:
    """A binary file to write `path` through; the object is published (its marker written) only when
    the block ends normally. On an exception the upload is aborted and nothing is published."""
    fs, key = path.fs, path.path
    if fs.exists(marker(path).path):
        fs.rm_file(marker(path).path)
    if isinstance(fs, MemoryFileSystem):  # its files commit on close, even from __del__
        buffer = io.BytesIO()
        yield buffer
        fs.pipe_file(key, buffer.getvalue())
    else:
        handle = fs.open(key, "wb")
        try:
            yield handle
        except BaseException:
            handle.discard()  # s3fs: abort the multipart upload; a single PUT is simply never sent
            handle.closed = True
            raise
        handle.close()
    fs.pipe_file(marker(path).path, json.dumps({"bytes": fs.size(key)}).encode())


def is_published(path: Location) -> bool:
    """Locally: the file exists (rename is the commit). Remotely: its marker exists and the object
    still has the size the marker recorded."""
    if not is_remote(path):
        return path.is_file()
    try:
        recorded = json.loads(path.fs.cat_file(marker(path).path))
        return path.fs.size(path.path) == recorded["bytes"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def published_files(folder: Location, pattern: str) -> list[Location]:
    """Files in `folder` matching `pattern` that are published, in name order (hidden names skipped)."""
    if not is_remote(folder):
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))
    markers = folder.glob(pattern + MARKER_SUFFIX)
    files = [m.with_name(m.name.removesuffix(MARKER_SUFFIX)) for m in markers if not m.name.startswith(".")]
    return sorted((f for f in files if is_published(f)), key=lambda f: f.name)


def remove_unpublished(folder: Location) -> int:
    """Delete objects under a remote `folder` that no marker publishes (uploads an aborted or killed
    attempt left) and markers whose object is gone. Only call it while holding the run lock.
    Returns how many objects were left unpublished."""
    fs = folder.fs
    keys = set(fs.find(folder.path))
    markers = {k for k in keys if k.endswith(MARKER_SUFFIX)}
    stray = sorted(keys - markers - {k.removesuffix(MARKER_SUFFIX) for k in markers})
    orphans = sorted(m for m in markers if m.removesuffix(MARKER_SUFFIX) not in keys)
    if stray or orphans:
        fs.rm(stray + orphans)
    return len(stray)


def remove_tree(folder: Location) -> None:
    """Delete a folder and everything under it, if it exists."""
    if not is_remote(folder):
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.fs.exists(folder.path):
        folder.fs.rm(folder.path, recursive=True)


def make_dirs(folder: Location) -> None:
    """Create a local folder and its parents; object stores have no folders to create."""
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)


def expand(pattern: str) -> list[Location]:
    """Files matching a remote URL, glob or folder (every file under it), sorted; publication
    markers are not inputs."""
    base = location(pattern)
    fs = base.fs
    if any(ch in pattern for ch in "*?["):
        found = fs.glob(base.path, detail=True)
        keys = [k for k, info in found.items() if info.get("type") != "directory"]
    elif fs.isdir(base.path):
        keys = fs.find(base.path)
    else:
        keys = [base.path] if fs.exists(base.path) else []
    return [_child(base, k) for k in sorted(keys) if not k.endswith(MARKER_SUFFIX)]


def _child(base: UPath, key: str) -> UPath:
    return UPath(key, protocol=base.protocol, **base.storage_options)


def fingerprint_entry(path: Location) -> str:
    """What identifies a version of an input: URL, size and the back-end's version tag."""
    info = path.fs.info(path.path)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{path}\0{info.get('size')}\0{tag}\n"


def open_binary(path: str | os.PathLike | Location) -> IO[bytes]:
    """A readable binary stream for a local path or any fsspec URL, with the full `io` interface
    (fsspec's own files lack `readline(size)`)."""
    where = location(path)
    if not is_remote(where):
        return open(where, "rb")
    return io.BufferedReader(where.open("rb"))


def read_parquet(path: str | Location, **kwargs: Any):
    """`pq.read_table` for a local path or a remote object."""
    where = location(path)
    if not is_remote(where):
        return pq.read_table(where, **kwargs)
    with where.open("rb") as handle:
        return pq.read_table(handle, **kwargs)


def save_array(array: np.ndarray, path: Location) -> None:
    """`np.save` to a local file or a published remote object."""
    if not is_remote(path):
        np.save(path, array)
        return
    with publishing(path) as handle:
        np.save(handle, array)


def load_array(path: Location) -> np.ndarray:
    """A local `.npy` memory-mapped (only the rows used are read), a remote one read whole."""
    if not is_remote(path):
        return np.load(path, mmap_mode="r")
    return np.load(io.BytesIO(path.read_bytes()))


def parquet_file(path: str | Location) -> pq.ParquetFile:
    """A `pq.ParquetFile` (footer, schema, row groups) for a local path or a remote object."""
    where = location(path)
    return pq.ParquetFile(where if not is_remote(where) else where.open("rb"))


def stamp(path: Location) -> tuple[int, int]:
    """(change tag, size) of a file: its mtime in ns locally, a hash of the ETag remotely. Raises
    FileNotFoundError when it is absent."""
    if not is_remote(path):
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    info = path.fs.info(path.path)
    tag = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
    return zlib.crc32(tag.encode()), int(info.get("size") or 0)
