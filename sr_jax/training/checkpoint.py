"""Checkpoints with orbax: the whole train state and the data position, saved atomically, kept N at a time.

A checkpoint holds `state` (step, params, optimizer state) and `position` (JSON: step, epoch, batch in
the epoch). Restoring goes into abstract targets that carry shardings, so a checkpoint restores onto
any mesh. Any failure to restore (a tree or shapes that do not match the model, a truncated or garbled
file whatever exception the storage layer raises) and restored parameters that are not finite raise
`CheckpointError` naming the step folder; `Checkpointer.restore_newest` falls back to the newest step
that restores.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sr_jax.io import atomic_file
from sr_jax.training.steps import TrainState
from sr_jax.treeutil import mismatches, path_str


class CheckpointError(ValueError):
    pass


@contextlib.contextmanager
def storage_errors(where: Path, what: str) -> Iterator[None]:
    """Any failure of the storage layer inside (TensorStore and orbax raise many types for broken or unreadable
    files) as one CheckpointError naming `where` and saying what could not be done."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: {what}: {type(e).__name__}: {e}") from e


class _Closing:
    """`with X(...) as x:` closes the orbax manager on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Sealing(_Closing):
    """Seals finished steps on one background thread: re-reading a large checkpoint never stalls the loop.
    Whatever reads or deletes those files next (a save, whose retention may delete a step; a restore; close)
    first waits for the seal, and raises what it raised."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seal")  # one seal at a time
        self.sealing: concurrent.futures.Future | None = None

    def _seal_later(self, job) -> None:
        self.sealing = self.sealer.submit(job)

    def _sealed(self) -> None:
        if self.sealing is not None:
            self.sealing.result()
            self.sealing = None

    def close(self) -> None:
        try:
            self._sealed()
        finally:
            self.sealer.shutdown()
            self.manager.close()


class Checkpointer(_Sealing):
    """The train state every `every` steps (orbax, the newest `keep`), each finished step sealed with its
    files' CRC32s off the loop (`_Sealing`)."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 1):
        super().__init__(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `save(step)` would write a checkpoint (every `every` steps)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: TrainState, position: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()), position=ocp.args.JsonSave(position))
        self._sealed()  # the last seal is done (it reads files that orbax's retention may delete next)
        saved = self.manager.save(step, args=args, force=force)
        finished = [s for s in self.manager.all_steps() if s != step]
        if saved and finished:  # orbax finished the previous save before starting this one: seal it
            self._seal_later(lambda: seal(self.directory, finished))
        return saved

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores `step` (default: latest) into the structure, shapes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(lambda a: ocp.utils.to_shape_dtype_struct(a), abstract_state._asdict())
        self._sealed()
        sealed = verify(self.directory, step, trust_unsealed=step == max(self.manager.all_steps(), default=step))
        check_compatible(self.directory / str(step) / "state", self.item_metadata(step), target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore())
        with storage_errors(self.directory / str(step), "cannot restore"):
            restored = self.manager.restore(step, args=args)
        state = TrainState(**restored.state)
        check_finite(self.directory / str(step), state.params)
        if not sealed:  # the newest step of a killed run, restored whole and finite: sealed from now on
            seal(self.directory, [step])
        return state, dict(restored.position)

    def restore_newest(self, abstract_state: TrainState) -> tuple[TrainState, dict, list[str]]:
        """The newest checkpoint that restores -> (state, position, why each newer step was skipped); a
        CheckpointError listing every step's problem when none does."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (*self.restore(abstract_state, step), skipped)
            except CheckpointError as e:
                skipped.append(str(e))
        raise CheckpointError(f"{self.directory}: no checkpoint restores:\n  " + "\n  ".join(skipped))

    def item_metadata(self, step: int) -> Any:
        return _state_metadata(self.manager, self.directory, step)

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._sealed()
        seal(self.directory, self.manager.all_steps())


class BestCheckpoint(_Sealing):
    """The parameters of the step with the best validation score, kept by orbax's best-checkpoint policy
    (`best_fn`, max_to_keep=1) in its own folder, beside the latest-steps checkpoints that resume needs; each
    kept step is written and sealed off the loop (`_Sealing`)."""

    def __init__(self, directory: str | Path):
        super().__init__(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics["score"], best_mode="max", create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers={"params": ocp.StandardCheckpointHandler()}
        )

    def save(self, step: int, params: Any, score: float) -> None:
        """Offers `step`'s parameters with their score; orbax keeps them only if they are the best so far."""
        self._sealed()  # the last kept step is written and sealed (this save may delete it)
        if step in self.manager.all_steps():
            return  # a resumed run re-validating the step it resumed from
        self.manager.save(
            step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), metrics={"score": score}, force=True
        )

        def finish() -> None:
            self.manager.wait_until_finished()
            seal(self.directory, self.manager.all_steps())

        self._seal_later(finish)

    def best(self) -> tuple[int, float] | None:
        """(step, score) of the best step kept, or None before the first validation."""
        step = self.manager.best_step()
        return None if step is None else (step, float(self.manager.metrics(step)["score"]))

    def restore(self, abstract_params: Any, own: bool = False) -> Any:
        """The best step's parameters. `own`: the run that keeps this folder reads it (at its end), and trusts
        a step a kill left unsealed (then seals it); any other reader refuses an unsealed step."""
        self._sealed()
        step = self.manager.best_step()
        if step is None:
            raise CheckpointError(f"{self.directory}: no validated checkpoint")
        sealed = verify(self.directory, step, trust_unsealed=own)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)
        with storage_errors(self.directory / str(step), "unreadable checkpoint metadata"):
            saved = self.manager.item_metadata(step).params
        check_compatible(self.directory / str(step), saved, target)
        with storage_errors(self.directory / str(step), "cannot restore"):
            params = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
        check_finite(self.directory / str(step), params)
        if not sealed:
            seal(self.directory, [step])
        return params


class ParamsReader(_Closing):
    """Reads only the parameters of another run's train-state checkpoints (no optimizer state is read):
    the fine-tuning side of a checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoint folder")
        options = ocp.CheckpointManagerOptions(create=False)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "position": ocp.JsonCheckpointHandler()},
        )

    def step(self, step: int = -1) -> int:
        """`step`, or the latest when -1; an error if there is no such checkpoint."""
        steps = self.manager.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        if step == -1:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step}; there are {sorted(steps)}")
        return step

    def metadata(self, step: int) -> Any:
        """Shapes and dtypes of the saved parameters."""
        metadata = _state_metadata(self.manager, self.directory, step)
        if "params" not in metadata:
            raise CheckpointError(f"{self.directory / str(step)}: no parameters in this checkpoint")
        return metadata["params"]

    def restore(self, step: int, target: Any, partial: bool = False) -> Any:
        """The saved parameters, into `target`'s structure (ShapeDtypeStructs that carry shardings); a
        CheckpointError naming every parameter that differs (`partial`: the saved ones `target` lacks are left
        out, as a fine-tune does, which checks them itself)."""
        verify(self.directory, step)
        if not partial:
            check_compatible(self.directory / str(step), self.metadata(step), target)
        restore_args = ocp.checkpoint_utils.construct_restore_args({"params": target})
        args = ocp.args.PyTreeRestore(item={"params": target}, restore_args=restore_args, partial_restore=True)
        with storage_errors(self.directory / str(step), "cannot restore the parameters"):
            params = self.manager.restore(step, args=ocp.args.Composite(state=args)).state["params"]
        check_finite(self.directory / str(step), params)
        return params

    def close(self) -> None:
        self.manager.close()


CHECKSUMS = ".checksums"  # checkpoints/.checksums/STEP.json: {file: crc32} of each finished step's files


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(step_dir)): _crc32(p) for p in sorted(step_dir.rglob("*")) if p.is_file()}


def seal(directory: Path, steps) -> None:
    """Records the CRC32 of every file of each finished step that has no record yet (process 0), and drops the
    records of steps orbax has deleted: what `verify` checks, so that a bit flipped on disk is found."""
    if jax.process_index() != 0:
        return
    records = directory / CHECKSUMS
    records.mkdir(exist_ok=True)
    for step in steps:
        if not (records / f"{step}.json").exists() and (directory / str(step)).is_dir():
            with atomic_file(records / f"{step}.json") as tmp:
                tmp.write_text(json.dumps(_files(directory / str(step))))
    kept = {f"{s}.json" for s in steps}
    for record in records.glob("*.json"):
        if record.name not in kept and not (directory / record.stem).is_dir():
            record.unlink()


def verify(directory: Path, step: int, trust_unsealed: bool = False) -> bool:
    """A CheckpointError naming the first file of `step` that changed, went missing or appeared since it was
    sealed, or its checksum record when that is damaged (not JSON, empty). A step without a record cannot be
    checked, so it is not trusted (a CheckpointError), unless `trust_unsealed`: a run resuming its own newest
    step, which a kill between orbax's save and the seal leaves unsealed. -> whether the step was sealed."""
    record = directory / CHECKSUMS / f"{step}.json"
    if not record.exists():
        if trust_unsealed:
            return False
        raise CheckpointError(
            f"{directory / str(step)}: no checksum record ({record.name} in {record.parent}), so whether its files "
            "changed since it was saved cannot be checked; resume the run that wrote it (which seals it), or use "
            "another step"
        )
    try:
        saved = json.loads(record.read_text())
        if not isinstance(saved, dict) or not saved:
            raise ValueError("not a record of the step's files")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{record}: damaged checksum record ({e}); step {step} cannot be verified") from e
    now = _files(directory / str(step))
    for name in sorted(saved.keys() | now.keys()):
        if saved.get(name) != now.get(name):
            problem = "is missing" if name not in now else "is new" if name not in saved else "changed on disk"
            raise CheckpointError(
                f"{directory / str(step) / name}: {problem} since the checkpoint was saved (checksum)"
            )
    return True


def _state_metadata(manager: ocp.CheckpointManager, directory: Path, step: int) -> Any:
    """The saved train state's metadata (shapes and dtypes); a CheckpointError when it cannot be read."""
    with storage_errors(directory / str(step), "unreadable checkpoint metadata"):
        metadata = manager.item_metadata(step).state
    if metadata is None:
        raise CheckpointError(f"{directory / str(step)}: no train state in this checkpoint")
    return metadata


def check_finite(where: Path, params: Any) -> None:
    """A restored parameter with NaN or inf is a broken checkpoint, not a model to train or evaluate."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not bool(jnp.isfinite(leaf).all()):
            raise CheckpointError(f"{where}: parameter params/{path_str(path)} holds NaN or inf values")


def check_compatible(where: Path, saved: Any, target: Any, free_first_axis: frozenset[str] = frozenset()) -> None:
    """A CheckpointError naming every parameter whose path or shape differs (see `treeutil.mismatches`)."""
    if problems := mismatches(saved, target, free_first_axis):
        listed = "\n  ".join(problems)
        raise CheckpointError(f"{where}: {len(problems)} parameter(s) do not match the model:\n  {listed}")


def write_record(path: Path, **arrays: np.ndarray) -> None:
    """Saves one of a run's records for the runs started from it (an .npz of `arrays`), atomically."""
    with atomic_file(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_record(path: Path, missing: str) -> dict[str, np.ndarray]:
    """A record `write_record` saved; a CheckpointError saying `missing` (what to do) when there is none."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: missing; {missing}")
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}
