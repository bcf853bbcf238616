"""One writer per output: an exclusive lock held for as long as a command writes a journal.

Two `moegen generate` runs on one `--out` would append to the same journal and splice each
other's lines (and each generate every row). So a journal is opened only under an exclusive
`fcntl.flock` on `OUT.journal.lock`; a second process refuses at once, naming the holder's PID,
or with `wait` blocks until the holder is done. The kernel drops the lock when its holder dies
(kill -9 included), so a crash never leaves a stale lock behind -- once every process sharing the
descriptor is gone: a child the writer forked keeps it, and a killed process lets go only as the
kernel tears it down. So where the PID in the lock file is no longer alive, the lock is the dead
writer's leftover and a new writer waits for it (up to DEAD_HOLDER_WAIT_S) instead of refusing:
that is how a flow run resumed after a crash finds its journal (measured: refused now and then).

Why a file of its own: the output and its sidecar are replaced by rename (a new inode each time),
and a lock on a replaced file guards nothing. The lock file is removed by its holder on release;
whoever locks it afterwards checks that the file it locked is still the one at the path, else
retries, so a waiter that locked a removed file never believes it holds the lock.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from moegen.errors import OutputBusyError, storage_fault

DEAD_HOLDER_WAIT_S = 120.0       # a dead writer's lock, kept by what it left behind, is waited for this long


def lock_path(out) -> Path:
    return Path(f"{out}.journal.lock")


class OutputLock:
    """An exclusive lock on OUT.journal.lock, taken by the constructor (see the module doc)."""

    def __init__(self, out, wait: bool = False):
        self.out, self.path, self.fd = Path(out), lock_path(out), None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire(wait)
        except OSError as e:
            raise storage_fault(e, f"cannot lock {self.path}") from None

    def _acquire(self, wait: bool) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd, wait):
                    continue                          # we locked a lock file its holder had removed
            except BaseException:
                os.close(fd)
                raise
            # the holder's PID, for the error message of the next process that tries
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return

    def _lock(self, fd: int, wait: bool) -> bool:
        """Lock fd; False (fd closed) when the file was removed or replaced meanwhile."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_pid(fd)
            if wait:
                print(f"waiting for {describe(holder)}, which is writing {self.out}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            elif holder is not None and not alive(holder):       # what a dead writer left behind holds it
                if not _lock_within(fd, DEAD_HOLDER_WAIT_S):
                    raise OutputBusyError(f"{self.out}: its writer (pid {holder}) is gone, but a process it left "
                                          f"behind still holds {self.path} after {DEAD_HOLDER_WAIT_S:.0f} s: stop "
                                          f"that process (`fuser {self.path}` names it)") from None
            else:
                raise OutputBusyError(f"{self.out} is being written by another process ({describe(holder)}); "
                                      "two writers would splice the journal: wait for it to finish, or pass "
                                      "--wait (flows: wait=true) to start when it does") from None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            return False
        return True

    def release(self) -> None:
        """Remove the lock file while still holding it (module doc), then let go."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass                                      # a folder gone or read-only: the lock still ends
        os.close(self.fd)
        self.fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- at interpreter exit the kernel drops the lock anyway
            pass


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:                  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:      # another user's process: alive
            return True
        return True


def _lock_within(fd: int, seconds: float) -> bool:
    """Try to lock fd until `seconds` have passed; whether it was locked."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def describe(pid: int | None) -> str:
    return f"pid {pid}" if pid is not None else "pid not known yet"
