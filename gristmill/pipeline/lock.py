"""One writer per run folder: `gristmill run` holds a lock on the folder for as long as it writes.

Locally the lock is an OS file lock (`flock`) on `<run folder>/_LOCK`. The kernel drops it when the
holding process dies, so a killed run never blocks the next one; the file also names the holder
(host, pid, process start time, when it took the lock) for the message a second run prints.

`force_unlock` is for a lock whose holder is dead but which is still held: a stray process that
inherited the open file, or a holder on another machine sharing the folder. It refuses while the
recorded holder is a live process on this machine.

Object stores have no file locks. There the lock is a lease: `<run folder>/_LEASE.json` names the
holder and an expiry; a background thread renews it every third of its term while the run lasts.
A second run refuses while an unexpired lease names someone else; a killed run's lease simply
expires (after `LEASE_S`), or `--force-unlock` takes it over at once. An object store cannot
compare-and-swap through fsspec, so after writing its lease a run reads it back and gives up if
another run's name is there: two runs starting in the same second are caught, not prevented.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from gristmill.pipeline import io, storage

LOCK_FILE = "_LOCK"
LEASE_FILE = "_LEASE.json"
LEASE_S = 120.0
_ATTEMPTS, _RETRY_S = 10, 0.1


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder: enough to tell a live holder from a dead one."""

    host: str
    pid: int
    process_started: float  # psutil create_time of the pid, so a reused pid is not taken for it
    locked_at: str

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, psutil.Process(pid).create_time(),
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def is_alive(self) -> bool | None:
        """True or False for a holder on this machine; None when it runs elsewhere (unknowable)."""
        if self.host != socket.gethostname():
            return None
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) < 1.0
        except psutil.NoSuchProcess:
            return False

    def describe(self) -> str:
        alive = {True: "running", False: "no longer running", None: "on another machine"}[self.is_alive()]
        return f"host {self.host}, pid {self.pid} ({alive}), since {self.locked_at}"


def read_holder(run_dir: str | os.PathLike) -> Holder | None:
    """The holder recorded in a run folder's lock file (the last one to take it), if any."""
    try:
        return Holder(**json.loads((Path(run_dir) / LOCK_FILE).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


class RunLock:
    """An exclusive, non-blocking lock on one run folder."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, force_unlock: bool = False) -> None:
        """Take the lock or raise RunLocked naming the holder. With `force_unlock`, a lock held for a
        dead holder is broken: its file is replaced, so the old lock no longer guards anything."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):  # `gristmill status` may hold a shared lock for a moment
            if self._try_lock():
                return
            time.sleep(_RETRY_S)
        holder = read_holder(self.run_dir)
        who = holder.describe() if holder else "an unknown process"
        if not force_unlock:
            raise RunLocked(
                f"{self.run_dir} is locked by another gristmill run ({who}). Wait for it to finish; if "
                f"that process is dead, rerun with --force-unlock."
            )
        if holder is not None and holder.is_alive():
            raise RunLocked(f"{self.run_dir}: will not force the lock of a live run ({who}); stop it first.")
        self.path.unlink(missing_ok=True)
        if not self._try_lock():
            raise RunLocked(f"{self.run_dir}: another run took the lock while it was being forced")

    def _try_lock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(asdict(Holder.this_process())).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up; the file stays (removing it would race with the next acquirer)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LeaseLock:
    """The lock of a run folder on object storage: a lease object with an expiry, renewed while held."""

    def __init__(self, run_dir: storage.Location, lease_s: float = LEASE_S):
        self.run_dir = run_dir
        self.path = run_dir / LEASE_FILE
        self.lease_s = lease_s
        self.holder = Holder.this_process()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, force_unlock: bool = False) -> None:
        """Take the lease or raise RunLocked naming the holder of an unexpired one."""
        current = read_lease(self.run_dir)
        if current is not None and current[0] != self.holder:
            holder, expires = current
            if not force_unlock:
                raise RunLocked(
                    f"{self.run_dir} is leased by another gristmill run ({holder.describe()}) until "
                    f"{_iso(expires)}. Wait for it to finish; if that run is dead, its lease expires by "
                    f"itself, or rerun with --force-unlock."
                )
            if holder.is_alive():
                raise RunLocked(f"{self.run_dir}: will not force the lease of a live run ({holder.describe()})")
        self._write()
        time.sleep(_RETRY_S)
        current = read_lease(self.run_dir)
        if current is None or current[0] != self.holder:
            raise RunLocked(f"{self.run_dir}: another run took the lease at the same moment; try again")
        self._renewer = threading.Thread(target=self._renew, name="gristmill-lease", daemon=True)
        self._renewer.start()

    def _write(self) -> None:
        io.write_json_atomic({"holder": asdict(self.holder), "expires": time.time() + self.lease_s}, self.path)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self._write()

    def release(self) -> None:
        """Stop renewing and delete the lease."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
            io.remove_file(self.path)


def read_lease(run_dir: storage.Location) -> tuple[Holder, float] | None:
    """(holder, expiry as a Unix time) of an unexpired lease on a remote run folder, else None."""
    lease = io.read_json(run_dir / LEASE_FILE)
    if not lease or lease.get("expires", 0) < time.time():
        return None
    try:
        return Holder(**lease["holder"]), float(lease["expires"])
    except (KeyError, TypeError):
        return None


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


@contextmanager
def run_lock(run_dir: str | os.PathLike, force_unlock: bool = False) -> Iterator[RunLock | LeaseLock]:
    """Hold the lock of `run_dir` (a file lock locally, a lease on object storage) for the block."""
    where = storage.location(run_dir)
    lock = LeaseLock(where) if storage.is_remote(where) else RunLock(where)
    lock.acquire(force_unlock)
    try:
        yield lock
    finally:
        lock.release()


def current_holder(run_dir: str | os.PathLike) -> Holder | None:
    """The holder of a run folder's lock while it is held, None when the folder is free."""
    where = storage.location(run_dir)
    if storage.is_remote(where):
        lease = read_lease(where)
        return lease[0] if lease else None
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(run_dir)  # None only in the instant before a new holder writes its name
    finally:
        os.close(fd)
    return None
