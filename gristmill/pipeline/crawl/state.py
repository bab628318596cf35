"""The crawl's resume state: one SQLite file beside the WARC files.

It holds every URL ever queued (so a URL is fetched at most once: the seen set), which of them are
done, the crawl log, robots.txt bodies, and how many bytes of the current WARC file are committed.
The outcome of one fetch (URL done, links found, log rows, WARC position) is one transaction, so a
crawl killed at any moment restarts from a consistent state: the WARC file is cut back to the last
committed byte and every URL not marked done is fetched again.

The log is also copied, while the crawl runs, into `crawl_log/part-NNNNN.parquet` files (each the
committed rows after the previous part), so a running crawl can be watched.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from gristmill.pipeline import io
from gristmill.pipeline.crawl.frontier import FrontierEntry

STATE_FILE = "crawl_state.sqlite"
LOG_PARTS_FOLDER = "crawl_log"

LOG_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("status", pa.int32()),
        ("content_type", pa.string()),
        ("bytes", pa.int64()),
        ("fetch_time", pa.timestamp("us", tz="UTC")),
        ("elapsed_s", pa.float64()),
        ("depth", pa.int32()),
        ("error", pa.string()),
        ("robots_meta", pa.string()),
        ("links_over_cap", pa.int64()),
    ]
)
_INSERT_LOG = "INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"

_TABLES = """
CREATE TABLE IF NOT EXISTS urls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL UNIQUE,
    depth INTEGER NOT NULL,
    redirects INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    stored INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS log (
    url TEXT, status INTEGER, content_type TEXT, bytes INTEGER, fetch_time TEXT,
    elapsed_s REAL, depth INTEGER, error TEXT, robots_meta TEXT, links_over_cap INTEGER
);
CREATE TABLE IF NOT EXISTS robots (origin TEXT PRIMARY KEY, status INTEGER, body BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass
class LogRow:
    """One fetch attempt's outcome (a row of `crawl_log.parquet`)."""

    url: str
    status: int | None
    content_type: str | None
    bytes: int
    fetch_time: datetime
    elapsed_s: float
    depth: int | None
    error: str | None
    robots_meta: str | None = None  # the page's meta robots directives, e.g. "noindex,nofollow"
    links_over_cap: int | None = None  # followable links past max_links_per_page (HTML pages kept only)

    def as_tuple(self) -> tuple:
        return (self.url, self.status, self.content_type, self.bytes, self.fetch_time.isoformat(),
                self.elapsed_s, self.depth, self.error, self.robots_meta, self.links_over_cap)


class CrawlState:
    """The SQLite resume state of one crawl folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / STATE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_TABLES)
        present = [row[1] for row in self._db.execute("PRAGMA table_info(log)")]
        for column, kind in (("robots_meta", "TEXT"), ("links_over_cap", "INTEGER")):
            if column not in present:  # a state from before the column
                self._db.execute(f"ALTER TABLE log ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _insert_new(self, entries: list[tuple[str, int, int]]) -> list[FrontierEntry]:
        new = []
        for url, depth, redirects in entries:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO urls (url, depth, redirects) VALUES (?, ?, ?)", (url, depth, redirects)
            )
            if cursor.rowcount:
                new.append(FrontierEntry(depth, cursor.lastrowid, url, redirects))
        return new

    def add_urls(self, entries: list[tuple[str, int, int]]) -> list[FrontierEntry]:
        """Queue `(url, depth, redirects)` entries never seen before; returns those that were new."""
        with self._db:
            self._db.execute("BEGIN")
            return self._insert_new(entries)

    def queued(self) -> list[FrontierEntry]:
        """URLs seen but not done, in queue order (what a restarted crawl still has to fetch)."""
        rows = self._db.execute(
            "SELECT depth, seq, url, redirects, attempts FROM urls WHERE done = 0 ORDER BY seq"
        ).fetchall()
        return [FrontierEntry(*row) for row in rows]

    def finish(self, entry: FrontierEntry, stored: bool, log: list[LogRow],
               discovered: list[tuple[str, int, int]], warc_position: str | None) -> list[FrontierEntry]:
        """Record the final outcome of `entry` in one transaction; returns the newly queued URLs."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE urls SET done = 1, stored = ? WHERE url = ?", (int(stored), entry.url))
            self._db.executemany(_INSERT_LOG, [r.as_tuple() for r in log])
            if warc_position is not None:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('warc_position', ?)", (warc_position,))
            return self._insert_new(discovered)

    def retry(self, entry: FrontierEntry, log: LogRow) -> None:
        """Record a failed attempt of `entry` that will be tried again."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE urls SET attempts = ? WHERE url = ?", (entry.attempts, entry.url))
            self._db.execute(_INSERT_LOG, log.as_tuple())

    def log_row(self, row: LogRow) -> None:
        self._db.execute(_INSERT_LOG, row.as_tuple())

    def pages_stored(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM urls WHERE stored = 1").fetchone()[0]

    def robots(self, origin: str) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT status, body FROM robots WHERE origin = ?", (origin,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def save_robots(self, origin: str, status: int, body: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO robots VALUES (?, ?, ?)", (origin, status, body))

    def unwritten_log_rows(self) -> int:
        """How many log rows are not in a `crawl_log/` part yet."""
        last = self._db.execute("SELECT MAX(rowid) FROM log").fetchone()[0] or 0
        return last - int(self.get_meta("log_parts_rowid") or 0)

    def write_log_part(self, folder: Path) -> None:
        """Write the log rows after the last part as the next `crawl_log/part-NNNNN.parquet`.

        The part is written (atomically) before the state records it, so after a kill the next part
        gets the same number and replaces it with the same rows and any later ones: no row is ever
        in two parts, and the parts in number order are the log in order.
        """
        done_rowid = int(self.get_meta("log_parts_rowid") or 0)
        last = self._db.execute("SELECT MAX(rowid) FROM log").fetchone()[0] or 0
        if last <= done_rowid:
            return
        index = int(self.get_meta("log_parts") or 0)
        io.write_parquet_atomic(self.log_table(done_rowid, last),
                                Path(folder) / LOG_PARTS_FOLDER / f"part-{index:05d}.parquet")
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('log_parts', ?)", (str(index + 1),))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('log_parts_rowid', ?)", (str(last),))

    def log_table(self, after_rowid: int = 0, upto_rowid: int | None = None) -> pa.Table:
        """The crawl log (rows after `after_rowid`, up to `upto_rowid`), in the order the outcomes happened."""
        rows = self._db.execute(
            "SELECT * FROM log WHERE rowid > ? AND rowid <= ? ORDER BY rowid",
            (after_rowid, upto_rowid if upto_rowid is not None else 2**63 - 1),
        ).fetchall()
        columns = list(zip(*rows)) if rows else [[] for _ in LOG_SCHEMA]
        arrays = [pa.array(list(col), type=f.type) if f.name != "fetch_time" else
                  pa.array([datetime.fromisoformat(t).astimezone(timezone.utc) for t in col], type=f.type)
                  for col, f in zip(columns, LOG_SCHEMA)]
        return pa.Table.from_arrays(arrays, schema=LOG_SCHEMA)
