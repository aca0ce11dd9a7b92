"""One writer per stage output: an exclusive lock on a file beside the output directory.

The lock is an OS file lock (`flock`), so the kernel releases it when its process dies: a lock left by a killed
run is simply free again, with no staleness rule to get wrong. The file itself names the holder (pid, host, start
time) so that a refused second writer can say who holds it, and is removed on release. It sits beside the output
directory, not inside, because `--overwrite` removes the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from pipeline.errors import StageError


class OutputLock:
    """`with OutputLock(path, stage):` holds `<parent>/.<name>.lock` for the block, or refuses with the holder."""

    def __init__(self, output: Path, stage: str):
        self.output, self.stage = Path(output), stage
        self.file = self.output.parent / f".{self.output.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise StageError(f"{self.output}: another tauflow process is writing it ({holder}); wait for it or stop it") from None
            if self._still_linked(fd):
                break
            os.close(fd)  # the holder released and removed this file between our open and our lock: start over
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                "started": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"{info['stage']}, pid {info['pid']} on {info['host']}, since {info['started']}"
        except (ValueError, KeyError):
            return "holder unknown"

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            self.file.unlink(missing_ok=True)  # while still locked, so no one can have locked this file meanwhile
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
