"""One run folder, one writer: ``<folder>/run.lock`` names the process that writes into the folder.

The lock file is created with ``O_CREAT | O_EXCL``, so of two processes that start together exactly
one gets it; the other is refused with a message naming the holder (pid, host, start time,
command). A lock left behind by a process that no longer runs on this host (killed, machine
reset) is taken over with a warning; a lock of another host cannot be checked from here, so the
message says which file to delete once that run is known to be gone. Under ``accelerate launch``
only the process with ``RANK`` 0 takes the lock: its peers write into the same folder by design.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from semivit.errors import OutputDirError, RunLockedError
from semivit.runtime.layout import LOCK

LOCK_NAME = LOCK
_UNREADABLE_GRACE_S = 5.0  # a lock file this young may still be being written by its creator
_ATTEMPTS = 20
_HELD: dict[str, RunLock] = {}  # folder -> the lock this process holds there (nested commands share it)


def is_lock_rank() -> bool:
    """The process that takes the lock: RANK 0 of a launch, or a process that was not launched."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell a reused pid from the
    holder itself; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


class RunLock:
    def __init__(self, folder: str | Path, command: str, label: str = "", setting: str = "output_dir"):
        self.folder = Path(folder)
        self.setting = setting  # the setting that moves the writes elsewhere, for the messages
        self.path = self.folder / LOCK_NAME
        self.command = command[:300]
        self.label = label or "run lock"
        self.token = uuid.uuid4().hex
        self.depth = 0
        self.created: list[Path] = []

    # ---- what the file holds --------------------------------------------------------------

    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "start_ticks": process_start_ticks(os.getpid()),
            "token": self.token,
        }

    def _read(self) -> tuple[dict | None, bytes | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
        except ValueError:
            return None, raw
        return (holder if isinstance(holder, dict) else None), raw

    # ---- taking and giving back -----------------------------------------------------------

    def acquire(self) -> None:
        self._make_folder()
        for _ in range(_ATTEMPTS):
            if self._create():
                return
            holder, raw = self._read()
            if raw is None:
                continue  # released between our two steps: try again
            if holder is None:
                if self._age() < _UNREADABLE_GRACE_S:
                    time.sleep(0.1)
                    continue
                holder = {}
            if not self._is_stale(holder):
                raise RunLockedError(self._refusal(holder))
            self._warn_takeover(holder)
            self._break(raw)
        raise RunLockedError(f"could not take '{self.path}' after {_ATTEMPTS} attempts; is another run starting there?")

    def release(self) -> None:
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for folder in self.created:  # only those still empty: rmdir refuses the others
            try:
                folder.rmdir()
            except OSError:
                break

    def _make_folder(self) -> None:
        # the folders made here, innermost first: a command that fails before writing anything
        # leaves no empty run folder behind (see release)
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.created = missing
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(self.folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(self.folder))
        except OSError as e:
            raise OutputDirError(self._unwritable(e)) from e

    def _create(self) -> bool:
        """True when this process created the lock file (atomically: O_EXCL)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise OutputDirError(self._unwritable(e)) from e
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
            f.write("\n")
        return True

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _is_stale(self, holder: dict) -> bool:
        """The holder is a process of this host that is gone (or a pid since reused by another)."""
        if not holder:  # unreadable long after its creation: its writer died mid-write
            return True
        if holder.get("host") != socket.gethostname():
            return False
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            return True
        if pid == os.getpid():
            # this process, but not a lock it holds now: left by an earlier life of this pid
            return not any(lock.token == holder.get("token") for lock in _HELD.values())
        if not pid_alive(pid):
            return True
        ticks = holder.get("start_ticks")
        return ticks is not None and process_start_ticks(pid) not in (None, ticks)

    def _break(self, raw: bytes) -> None:
        """Remove the stale lock we read, and nothing else: it is first renamed aside (atomic, so of
        two processes breaking it one wins), then compared with what was judged stale; a lock that
        a new holder created in between is put back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != raw:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    # ---- messages -------------------------------------------------------------------------

    def _holder_text(self, holder: dict) -> str:
        if not holder:
            return "an unreadable lock"
        return (
            f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}, "
            f"command '{holder.get('command')}'"
        )

    def _refusal(self, holder: dict) -> str:
        return (
            f"run folder '{self.folder}' is in use by {self._holder_text(holder)}; wait for it to finish or use "
            f"another {self.setting}=DIR (if that process is gone, delete '{self.path}')"
        )

    def _unwritable(self, e: OSError) -> str:
        if self.folder.exists() and not self.folder.is_dir():
            reason = "it is a file"
        else:
            reason = (e.strerror or type(e).__name__).rstrip(".").lower()
        return (
            f"run folder '{self.folder}' cannot be written ({reason}); set {self.setting}=DIR to a folder you can write"
        )

    def _warn_takeover(self, holder: dict) -> None:
        print(
            f"{self.label}: warning: taking over '{self.path}' left by {self._holder_text(holder)}, "
            "which no longer runs",
            file=sys.stderr,
            flush=True,
        )

    # ---- context manager (nested use in one process shares the lock) ----------------------

    def __enter__(self) -> RunLock:
        key = str(self.folder.resolve())
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
            return held
        self.acquire()
        self.depth = 1
        _HELD[key] = self
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.folder.resolve())
        held = _HELD.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth <= 0:
            _HELD.pop(key, None)
            held.release()


@contextlib.contextmanager
def run_lock(
    folder: str | Path | None, command: str, label: str = "", setting: str = "output_dir"
) -> Iterator[RunLock | None]:
    """Hold the lock of ``folder`` for the block (nothing when ``folder`` is None or on a rank > 0)."""
    if folder is None or not is_lock_rank():
        yield None
        return
    with RunLock(folder, command, label, setting) as lock:
        yield lock


def lock_folder(target: str | Path, run_dir: str | Path) -> Path:
    """The folder whose lock guards writes into ``target``: the run folder when ``target`` lies in it
    (one lock per run), else ``target`` itself."""
    target, run_dir = Path(target).resolve(), Path(run_dir).resolve()
    return run_dir if target == run_dir or run_dir in target.parents else target
