"""Atomic writes (a file or folder appears complete under its final name, or not at all), and one writer
per folder (`exclusive`)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _writer() -> str:
    """This process's tag in a temporary's name: pid@host, so a later writer knows a dead one's leftovers."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname().split('.')[0]) or 'host'}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Removes the temporaries in `folder` named `prefix` + pid@host (then `~`, `.` or the end) that a writer on
    this host left when it was killed mid-write (its pid no longer runs); another host's, or a live writer's, are
    left alone."""
    removed, host = [], _writer().split("@", 1)[1]
    for path in folder.glob(glob.escape(prefix) + "*"):
        found = re.match(r"(\d+)@([A-Za-z0-9-]+)(~|\.|$)", path.name[len(prefix) :])
        if found and found.group(2) == host and not _alive(int(found.group(1))):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path, check: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """Yields a temporary sibling of `final` to fill; once filled it is checked and renamed to `final`
    (replacing it); on any error it is removed and `final` is left as it was. A killed writer's temporary is
    removed by the next writer of the same folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{final.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_writer()}~", dir=final.parent))
    try:
        yield tmp
        if check is not None:
            check(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yields a temporary path beside `final` (same suffix) to write; renamed to `final` on success. A killed
    writer's temporary is removed by the next writer of the same file."""
    remove_stale(final.parent, f".{final.stem}.tmp-")
    tmp = final.with_name(f".{final.stem}.tmp-{_writer()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


class FolderLocked(RuntimeError):
    """Another process holds the folder's writer lock."""


LOCK = ".lock"  # folder/.lock: {"host", "pid"} of the writer, its mtime the writer's heartbeat
HEARTBEAT_S = 10.0  # how often a holder touches its lock
STALE_S = 60.0  # a lock not touched for this long belongs to a writer that died (on any host)


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "run", wait: bool = False) -> Iterator[None]:
    """Holds the writer lock of `folder` while the block runs; a second writer fails at once with FolderLocked
    naming the holder's host and pid (or, with `wait`, waits for it: a shared cache that the first one fills).
    Readers take no lock.

    The lock is a file created exclusively (`O_CREAT | O_EXCL`), which works where `flock` does not (NFS,
    object-store mounts such as gcsfuse that create with a precondition), holding the writer's host and pid; a
    thread touches it every HEARTBEAT_S. A lock is stale, and taken over, when its writer is a dead process of
    this host, or when it was not touched for STALE_S (a writer killed on another host): a killed writer never
    blocks the next one for long."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while not _create(path, me):
        holder = _holder(path)
        if _stale(path, holder):
            path.unlink(missing_ok=True)
            continue
        if not wait:
            raise FolderLocked(
                f"{folder}: another process (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is writing "
                f"this {what}; wait for it to finish, or use another folder"
            )
        time.sleep(0.2)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True, name="lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        if _holder(path) == me:
            path.unlink(missing_ok=True)


def _create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me) + "\n")
    return True


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # released, or being written this instant
        return {}
    return holder if isinstance(holder, dict) else {"legacy": holder}  # an flock-era file: a bare pid


def _stale(path: Path, holder: dict) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: try again
    if "legacy" in holder:
        return True  # left by the flock version, which never removed its lock file
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"])
    return age > STALE_S or (not holder and age > 5.0)  # a lock left empty by a writer killed mid-create


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
