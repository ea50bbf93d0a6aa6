"""Atomic writes (a file or folder appears complete under its final name, or not at all), one writer per
folder (`exclusive`), and the output rule: a command replaces only what it can recognise as its own earlier
output (`claim`)."""

from __future__ import annotations

import contextlib
import errno
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


MARK = ".sr-jax.json"  # in every folder a command writes: {"kind": ...}, so that a later command knows its own
IGNORED = (MARK, ".lock")  # what an otherwise empty folder may hold
KIND_KEY = "sr_jax_kind"  # a file's kind, in its format's metadata

# The kinds of output, each with the file that only it holds: how a folder written before marks is recognised.
RUN, SELECTION, DATASET = "run", "strategy selection", "dataset"
ARTIFACT, EMBEDDINGS, ENCODER = "serving artifact", "embeddings", "encoder"
PARAMS_RUN, SCORE_PARTS = "params-only run", "scoring job's parts"
SNAPSHOT, TEXT_CACHE = "pretrained run's records", "text cache"  # parts of a run folder and of a dataset
LEGACY = {RUN: "config.json", SELECTION: "strategy.json", DATASET: "meta.json", ARTIFACT: "manifest.json",
          EMBEDDINGS: "embeddings.json", ENCODER: "sr_jax_encoder.json", SCORE_PARTS: "job.json"}  # fmt: skip


class OutputExists(FileExistsError):
    """An output path holds something this command did not write (a user's folder, another kind of output)."""


def kind_of(path: Path) -> str | None:
    """What sr-jax wrote at `path`: a folder's MARK kind, or a file's kind in its format's metadata (Parquet
    schema metadata, safetensors metadata, a JSON object's KIND_KEY); for a folder written before marks, the
    kind whose file it holds (LEGACY). None: not recognised."""
    path = Path(path)
    if path.is_dir():
        if isinstance(found := _read_json(path / MARK), dict) and isinstance(found.get("kind"), str):
            return found["kind"]
        return next((kind for kind, name in LEGACY.items() if (path / name).exists()), None)
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            kind = (pq.read_schema(path).metadata or {}).get(KIND_KEY.encode())
            return kind.decode() if kind else None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                return (f.metadata() or {}).get(KIND_KEY)
        if path.suffix == ".json":
            found = _read_json(path)
            return found.get(KIND_KEY) if isinstance(found, dict) else None
    except Exception:  # unreadable or not of its suffix's format: not ours  # noqa: BLE001
        return None
    return None


def claim(
    path: str | Path,
    kind: str,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
    remedy: str = "choose another path, or pass --overwrite to replace it",
) -> Path:
    """Checks that a command may write its output `path` (a file or a folder) before it starts: `path` is
    missing, an empty folder, or `kind` output of an earlier command (`kind_of`); anything else (a user's
    files, a training run, another kind of output) is refused with OutputExists naming `path` and the
    `remedy`. `overwrite` lifts the refusal, but never for a path that is, or holds, one of the command's
    `inputs` (the run it exports, the dataset it reads)."""
    path = Path(path)
    for source in inputs:
        source = Path(source).absolute()
        if path.absolute() == source or path.absolute() in source.parents:
            raise OutputExists(f"{path}: the output would replace {source}, which this command reads; choose another")
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir() and all(p.name in IGNORED for p in path.iterdir()):
        return path
    found = kind_of(path)
    if found == kind or overwrite:
        return path
    what = f"a {found}" if found else "files this command did not write" if path.is_dir() else "a file it did not write"
    raise OutputExists(f"{path}: holds {what}, not the {kind} this command writes; nothing was changed: {remedy}")


def mark(folder: Path, kind: str) -> None:
    """Says in `folder` (created if missing) that sr-jax wrote it as `kind` (what `claim` recognises)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _read_json(folder / MARK) != {"kind": kind}:
        with atomic_file(folder / MARK) as tmp:
            tmp.write_text(json.dumps({"kind": kind}) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def atomic_dir(
    final: Path,
    kind: str,
    check: Callable[[Path], object] | None = None,
    overwrite: bool = False,
    inputs: tuple[str | Path, ...] = (),
) -> Iterator[Path]:
    """Yields a temporary sibling of `final` to fill, marked as `kind`; once filled it is checked and renamed
    to `final`. `final` may be replaced only where `claim` allows it (checked before and again just before the
    rename); on any error the temporary is removed and `final` is left as it was. A killed writer's temporary
    is removed by the next writer of the same folder."""
    final = Path(final)
    claim(final, kind, overwrite, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, f".{final.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{_writer()}~", dir=final.parent))
    try:
        with writing(final):
            (tmp / MARK).write_text(json.dumps({"kind": kind}) + "\n")
            yield tmp
            if check is not None:
                check(tmp)
        if final.exists() or final.is_symlink():
            claim(final, kind, overwrite, inputs)
            shutil.rmtree(final) if final.is_dir() and not final.is_symlink() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A full disk inside names `path` (numpy, pyarrow and file objects raise ENOSPC without a file name)."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC and not e.filename:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yields a temporary path beside `final` (same suffix) to write; renamed to `final` on success. A killed
    writer's temporary is removed by the next writer of the same file."""
    remove_stale(final.parent, f".{final.stem}.tmp-")
    tmp = final.with_name(f".{final.stem}.tmp-{_writer()}{final.suffix}")
    try:
        with writing(final):
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
    holder = _read_json(path)  # None: released, or being written this instant
    if holder is None:
        return {}
    return holder if isinstance(holder, dict) else {"legacy": holder}  # an older lock file: a bare pid


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
