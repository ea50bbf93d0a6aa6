"""Atomic writes (a file or folder appears complete under its final name, or not at all), and one writer
per folder (`exclusive`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: Path, check: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """Yields a temporary sibling of `final` to fill; once filled it is checked and renamed to `final`
    (replacing it); on any error it is removed and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
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
    """Yields a temporary path beside `final` (same suffix) to write; renamed to `final` on success."""
    tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}{final.suffix}")
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
