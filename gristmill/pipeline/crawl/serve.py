"""Serve a folder over HTTP on loopback for the length of a crawl (the quickstart's sample site).

The server listens on 127.0.0.1 only, on the given port (0: a free one), in a background thread,
and stops when the `with` block ends. It serves files and directory listings, nothing else.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SERVE_HOST = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # the crawl log records every request
        pass


@contextmanager
def serve_directory(folder: str | Path, port: int = 0) -> Iterator[tuple[str, int]]:
    """Serve `folder` at `http://127.0.0.1:<port>/`; yields `(host, port)`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"serve_directory: {folder} is not a folder")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = ThreadingHTTPServer((SERVE_HOST, port), handler)
    except OSError as error:
        raise OSError(f"serve_directory: cannot listen on {SERVE_HOST}:{port} ({error})") from error
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"serve {folder}", daemon=True)
    thread.start()
    try:
        yield SERVE_HOST, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
