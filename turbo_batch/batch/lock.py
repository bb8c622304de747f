"""One writer per output dir: an exclusive lock held for the whole run, taken before anything is written.

Owns: `OutputLock` (the `_lock` file in the output dir: an `fcntl.flock` held by the running process,
with the holder's host, pid and start time written inside for the message a second run prints).
The kernel drops a flock when its process dies, SIGKILL included, so a lock left by a killed run is
taken over by the next run without guessing from pids; the file itself stays. Must not touch: parts,
the manifest or any other file of the output dir (write.py owns them).
Note: flock is per host on network file systems; two hosts writing one shared dir are not covered.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from turbo_batch.errors import OutputError

LOCK = "_lock"


class OutputLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot lock output dir {self.path.parent}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            since = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
            )
            raise OutputError(
                f"{self.path.parent} is being written by another run (host {h.get('host', '?')}, pid "
                f"{h.get('pid', '?')}, started {since}); wait for it to finish or stop it"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
