"""Atomic writes (a file or folder appears complete under its final name, or not at all), and one writer
per folder (`exclusive`)."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import socket
import tempfile
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


@contextlib.contextmanager
def exclusive(folder: Path, what: str = "run", wait: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (an flock on `folder/.lock`, which records the holder's pid) while
    the block runs; a second writer fails at once with FolderLocked naming that pid (or, with `wait`, waits
    for it: a shared cache that the first one fills). Readers take no lock. The lock goes with the process:
    a killed writer leaves nothing that blocks the next one."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise FolderLocked(
            f"{folder}: another process (pid {holder}) is writing this {what}; wait for it to finish, or use "
            "another folder"
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
