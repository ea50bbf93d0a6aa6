"""What every entry point shares: `--workdir`, `--config NAME`, `section.field=value` overrides, logging
and JAX's persistent compilation cache."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
from safetensors import SafetensorError

from sr_jax import distributed
from sr_jax.config import Config, ConfigError, absolute_paths, config_changes, load_config, override, validate
from sr_jax.data.store import DatasetError
from sr_jax.io import FolderLocked
from sr_jax.training.checkpoint import CheckpointError
from sr_jax.training.loop import TrainingDiverged, TrainingInterrupted

log = logging.getLogger("sr_jax")


def parser(description: str, named_configs: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run folder: config, checkpoints, metrics, reports")
    if named_configs:
        p.add_argument(
            "--config",
            default=None,
            help="a configs/NAME.py to start from (default: the workdir's "
            "saved config.json when resuming, else configs/default.py)",
        )
    p.add_argument(
        "--allow-changes",
        action="store_true",
        help="resume a run with overrides that change what it trains (batch, data, schedule, model)",
    )
    p.add_argument("overrides", nargs="*", help="section.field=value, e.g. model.gating=cls train.epochs=2")
    return p


def add_overwrite(p: argparse.ArgumentParser, what: str = "OUT") -> None:
    """`--overwrite`: the one way past the output rule (`io.claim`): replace what the output holds though this
    command did not write it; never one of its inputs."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace what {what} holds though this command did not write it "
        "(a user's folder, a run, another kind of output; never an input)",
    )


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args`, with `section.field=value` overrides accepted anywhere on the command line: every bare
    `key=value` token (one that is not the value of a one-value option such as `--finetune`) is taken out
    before argparse reads the rest, so an option of several values (`--seeds 0 1 2`), wherever it stands,
    never swallows an override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    single = {s for a in p._actions if a.nargs is None and a.option_strings for s in a.option_strings}
    kept, overrides = [], []
    for i, token in enumerate(argv):
        bare = "=" in token and not token.startswith("-") and (i == 0 or argv[i - 1] not in single)
        (overrides if bare else kept).append(token)
    args = p.parse_args(kept)
    if getattr(args, "overrides", None):
        p.error(f"unrecognized arguments: {' '.join(args.overrides)} (overrides are section.field=value)")
    args.overrides = overrides
    return args


def config_from_name(name: str) -> Config:
    """`configs/NAME.py`'s `get_config()`, or the overrides of `configs/NAME.json` (what `train.tune` writes,
    e.g. `tuned/movielens/full`): the named starting points of the command line."""
    import importlib
    import json

    import configs

    saved = Path(configs.__file__).parent / f"{name}.json"
    if saved.is_file():
        try:
            return override(Config(), json.loads(saved.read_text())["overrides"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{saved}: not a named config (a JSON object with a list of 'overrides'): {e}") from e
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"no config named {name!r} in configs/") from e
    return module.get_config()


# What a resumed run may change freely: how it is evaluated, logged, checkpointed and laid out on devices.
# Anything else (the batch, the data, the schedule, the model) would silently change the data position,
# the learning-rate schedule or the shapes of what was saved.
RESUMABLE = ("data.eval_split", "data.eval_batch_size", "data.prefetch", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "finetune.pretrained", "mesh.")  # fmt: skip


def check_resume(saved: Path, cfg: Config, allow_changes: bool) -> Config:
    """`cfg`, for a run folder whose saved config is `saved`: refused (ConfigError naming the keys) when it
    changes what the run trains, unless `allow_changes`."""
    changed = [k for k in config_changes(load_config(saved), cfg) if not k.startswith(RESUMABLE)]
    if changed and not allow_changes:
        raise ConfigError(
            f"{saved}: resuming with {changed} changed would alter what this run trains (its data position, "
            "schedule or shapes); pass --allow-changes to resume anyway (the folder's changes.jsonl then records "
            "each change), or start another --workdir"
        )
    return cfg


def resolve_config(args: argparse.Namespace) -> Config:
    """The config a command runs with: saved (when resuming) or named, then the overrides on top, checked
    (`validate`, and against the saved config when resuming) before anything is written."""
    saved = Path(args.workdir) / "config.json"
    if args.config is None and saved.exists():
        base = load_config(saved)
    else:
        base = config_from_name(args.config or "default")
    cfg = absolute_paths(validate(override(base, args.overrides)))
    return check_resume(saved, cfg, args.allow_changes) if saved.exists() else cfg


def setup() -> None:
    """Logging, JAX's persistent compilation cache in `$SR_JAX_COMPILE_CACHE` (default ~/.cache/sr_jax/jax;
    empty: off), so a rerun or a sweep of same-shaped runs skips recompiling, and the multi-host wiring
    (`sr_jax.distributed`: a no-op unless its environment variables are set)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    # jax logs at INFO every backend it probes and lacks ("Unable to initialize backend 'tpu'"): not an error
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    cache = os.environ.get("SR_JAX_COMPILE_CACHE", str(Path.home() / ".cache" / "sr_jax" / "jax"))
    if cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    distributed.initialize()


# Errors about the user's input or state, whose message names the file, key, row or step: one line, no traceback.
# OSError covers a missing or existing file or folder and a full disk; ValueError a value the input gave (a
# damaged JSON file is a JSONDecodeError, a ValueError); SafetensorError a damaged weights file.
USER_ERRORS = (
    ConfigError,
    DatasetError,
    CheckpointError,
    FolderLocked,
    TrainingDiverged,
    OSError,
    ValueError,
    SafetensorError,
)


def full_disk(e: BaseException) -> Path | None:
    """The path whose write found the disk full: an OSError's (ENOSPC), or the first absolute path quoted in a
    storage layer's message (TensorStore reports `No space left on device [os_error_code='28']` inside a
    ValueError); None when `e` is not a full disk."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return Path(e.filename or ".")
    text = str(e)
    if "No space left on device" not in text and "os_error_code='28'" not in text:
        return None
    quoted = re.findall(r"[\"'](/[^\"']+)[\"']", text)
    return Path(quoted[-1]) if quoted else Path(".")


def one_line(e: BaseException) -> str:
    """The error as the one line a user reads: its message, and for a full disk the path and its free space."""
    if (where := full_disk(e)) is not None:
        folder = next((p for p in (where, *where.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(folder).free / 2**20
        return f"no space left on the device writing {where} ({free:.0f} MiB free in {folder}): free some, then rerun"
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split()) if "\n" not in text else text.strip()


@contextlib.contextmanager
def background_errors_in_one_line():
    """While the block runs, an exception outside the main thread is logged as one line: a thread's
    (`threading.excepthook`), a C++ callback's (TensorStore calls back into asyncio after orbax closed its
    event loop; Python prints those through `sys.excepthook`), an unraisable one, and a traceback that orbax's
    threads log through absl or its asyncio tasks through asyncio. A failed checkpoint write otherwise prints up
    to a hundred tracebacks before the command's own error line. When the block raises, the hooks stay until
    the process exits, and absl's and asyncio's logs and never-awaited coroutines are silenced: a failed save's
    threads and futures would echo its error after the command's error line, as they finish or are collected at
    exit."""
    hooks = (threading.excepthook, sys.excepthook, sys.unraisablehook)

    def thread_hook(args):
        if args.exc_type is not SystemExit:
            log.warning("in thread %s: %s", getattr(args.thread, "name", "?"), one_line(args.exc_value))

    def except_hook(kind, value, tb):
        if threading.current_thread() is threading.main_thread():
            hooks[1](kind, value, tb)
        else:  # the echo of an error the main thread reports (a callback into a closed event loop)
            log.debug("in a background callback: %s", one_line(value))

    def unraisable_hook(unraisable):
        log.debug("ignored in %r: %s", unraisable.object, one_line(unraisable.exc_value))

    def no_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{record.getMessage()} ({one_line(record.exc_info[1])})", None
            record.exc_info, record.exc_text = None, None
        return True

    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]  # orbax's, and its tasks' leftovers
    threading.excepthook, sys.excepthook, sys.unraisablehook = thread_hook, except_hook, unraisable_hook
    for logger in loggers:
        logger.addFilter(no_traceback)
    try:
        yield
    except BaseException:  # left installed; what orbax's threads and futures still say only echoes this error
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        raise
    threading.excepthook, sys.excepthook, sys.unraisablehook = hooks
    for logger in loggers:
        logger.removeFilter(no_traceback)


class Interrupted(BaseException):
    """A SIGTERM or SIGINT outside the training loop (which saves and stops by itself): while restoring,
    evaluating, writing reports or preparing data."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def interruptible(main: Callable[[], object]) -> object:
    """Runs an entry point's main with one behaviour for a stop: a SIGTERM or SIGINT ends the command with one
    line saying what was interrupted and the exit status 128 + the signal, as a process killed by it would; a
    training (which saves its step first) and every command resume when run again. An error in the input
    (USER_ERRORS) ends with `error: ` and its message and status 1, instead of a traceback (`SR_JAX_TRACEBACK=1`
    shows it). Meanwhile an error in a background thread (orbax's writers after a failed save) is one log line,
    not a traceback: the error the command itself then raises says what went wrong."""
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    quiet = contextlib.nullcontext() if os.environ.get("SR_JAX_TRACEBACK") else background_errors_in_one_line()
    try:
        with quiet:
            return main()
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(
            f"{Path(sys.argv[0]).stem or 'command'}: interrupted by {signal.Signals(signum).name} outside the training "
            "loop; what was saved stays (checkpoints, finished files): run the same command to resume",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
    except USER_ERRORS as e:
        if os.environ.get("SR_JAX_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if not distributed.peer_lost(e) or os.environ.get("SR_JAX_TRACEBACK"):
            raise
        print(
            f"error: process {jax.process_index()} of {jax.process_count()}: another process of this run stopped "
            f"({one_line(e)[:200]}); start the same command in every process to resume from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        # not sys.exit: JAX's exit handler would wait for the lost process at its shutdown barrier (100 s), then
        # abort with a C++ stack trace
        os._exit(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
