"""One writer per output: lock files for the encode job and the trainer, and orphan detection.

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
NFSv3+) holding who owns it: host, pid, the process's start time (so a recycled pid is not
mistaken for the owner) and when the lock was taken. A lock whose owner is on this host and no
longer running is *stale* and taken over with a message; a lock of another host is never taken
over (we cannot see its processes): the message says how to check and remove it by hand.

Directories created only to hold a lock are removed again when the lock is released and they
are empty, so a run refused before any work leaves nothing behind.

:func:`die_with_parent` makes a process stop when the process that launched it dies: torchrun
starts its workers in new sessions, so killing the launcher (or its process group) would leave
them training, and a restarted job would then share the run directory with them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LockError(RuntimeError):
    """The lock is held by another live process (or one we cannot check)."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def pid_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the owner recorded in a lock file (on this host) still runs."""
    pid = int(owner.get("pid", -1))
    if not pid_alive(pid):
        return False
    started = owner.get("pid_start")
    now = pid_start_ticks(pid)
    return started is None or now is None or int(started) == now  # same pid, same process


_HELD: list[RunLock] = []


class RunLock:
    """An exclusive lock file. ``acquire()`` or refuse with :class:`LockError`; ``release()``."""

    def __init__(self, path: str | os.PathLike[str], what: str, log: Any = None, reentrant: bool = False) -> None:
        self.path = Path(path)
        self.reentrant = reentrant  # this process may take it again (a function run twice in-process)
        self.what = what  # e.g. "encode job", "trainer": names the owner in messages
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.created_dirs: list[Path] = []
        self.held = False

    def _make_parents(self) -> None:
        missing = []
        p = self.path.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created_dirs = missing  # deepest first

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        self._make_parents()
        me = {
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": pid_start_ticks(os.getpid()),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.owner()
                if not owner:  # being written right now, or an empty/corrupt file
                    time.sleep(0.2)
                    owner = self.owner()
                mine = owner.get("host") == me["host"] and owner.get("pid") == me["pid"]
                if mine and (self.reentrant or not any(h.path.resolve() == self.path.resolve() for h in _HELD)):
                    # Ours: left by an earlier run in this same process (e.g. main() called twice).
                    self.path.unlink(missing_ok=True)
                    continue
                if owner.get("host") == me["host"] and not owner_alive(owner):
                    self.log(f"taking over the stale lock {self.path} of {owner.get('what', 'a')} process "
                             f"{owner.get('pid')} (no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                self._remove_created_dirs()
                who = (f"{owner.get('what', 'process')} pid {owner.get('pid')} on {owner.get('host')}, "
                       f"started {owner.get('started_utc', '?')}") if owner else "an unknown owner"
                raise LockError(
                    f"{self.path} is held by {who}; one {self.what} at a time may write here. Wait for it "
                    "to finish (or stop it); if it is gone (e.g. another host crashed), delete the lock file"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            _HELD.append(self)
            return self
        raise LockError(f"could not take the lock {self.path} (it keeps reappearing)")

    def release(self) -> None:
        if self.held:
            # Only remove our own lock (a crashed run's successor may have taken it over).
            if self.owner().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
            with contextlib.suppress(ValueError):
                _HELD.remove(self)
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in self.created_dirs:  # deepest first; only if nothing was put there
            with contextlib.suppress(OSError):
                d.rmdir()
        self.created_dirs = []


@contextlib.contextmanager
def run_lock(path: str | os.PathLike[str], what: str, log: Any = None) -> Iterator[RunLock]:
    lock = RunLock(path, what, log).acquire()
    try:
        yield lock
    finally:
        lock.release()


def release_held_locks() -> None:
    """Release every lock this process holds (exit paths that skip ``finally``, e.g. os._exit)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_held_locks)


def hold_for_ranks(path: str | os.PathLike[str], what: str, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns the outcome, so all refuse together.

    Call it on every rank at the same point (it is a collective when torch.distributed is
    initialised). Returns the held lock on rank 0, None elsewhere; raises :class:`LockError` on
    every rank if rank 0 was refused (only rank 0's message should be printed).
    """
    lock, error = None, ""
    if is_main:
        try:
            lock = RunLock(path, what, reentrant=True).acquire()
        except LockError as e:
            error = str(e)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise LockError(error)
    return lock


def die_with_parent(sig: int = signal.SIGTERM, poll_s: float = 2.0) -> None:
    """Get ``sig`` once when the parent process (the launcher) is gone.

    Linux: ``prctl(PR_SET_PDEATHSIG)`` with a private real-time signal whose handler (main thread)
    checks that the parent *process* is gone, then sends ``sig`` once. The check matters: the
    kernel signals the child each time the thread that started it exits and the child moves to
    another of the parent's threads, i.e. several times while a multi-threaded launcher dies
    (and also when just that thread ends). Elsewhere a daemon thread polls the parent pid. With
    SIGTERM the trainer finishes its step, saves and exits.

    Call it early, before connecting to the launcher's store (a worker orphaned there waits for
    the store's timeout): if the parent is already init (pid 1), the launcher died before this
    call and ``sig`` is sent at once. (Under a subreaper such an early death goes unnoticed; the
    run lock still keeps a second writer out.)
    """
    parent = os.getppid()
    if parent == 1:
        os.kill(os.getpid(), sig)
        return
    if parent <= 0:
        return
    fired = threading.Event()

    def fire() -> None:
        if not fired.is_set() and os.getppid() != parent:
            fired.set()
            os.kill(os.getpid(), sig)

    armed = False
    private = getattr(signal, "SIGRTMIN", None)
    if sys.platform.startswith("linux") and private is not None and threading.current_thread() is threading.main_thread():
        private = int(private) + 3
        with contextlib.suppress(Exception):
            import ctypes

            signal.signal(private, lambda signum, frame: fire())
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, private, 0, 0, 0) == 0  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died while arming
        fire()
        return
    if armed:
        return

    def watch() -> None:
        while not fired.is_set():
            time.sleep(poll_s)
            fire()

    threading.Thread(target=watch, name="sfd-parent-watch", daemon=True).start()
