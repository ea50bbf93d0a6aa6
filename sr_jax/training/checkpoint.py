"""Checkpoints with orbax: the whole train state and the data position, saved atomically, kept N at a time.

A checkpoint holds `state` (step, params, optimizer state) and `position` (JSON: step, epoch, batch in
the epoch). Restoring goes into abstract targets that carry shardings, so a checkpoint restores onto
any mesh; a checkpoint whose tree or shapes do not match the model raises `CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sr_jax.training.steps import TrainState
from sr_jax.treeutil import first_mismatch


class CheckpointError(ValueError):
    pass


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, every: int = 1):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, position: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()), position=ocp.args.JsonSave(position))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores `step` (default: latest) into the structure, shapes and shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        target = jax.tree.map(lambda a: ocp.utils.to_shape_dtype_struct(a), abstract_state._asdict())
        check_compatible(self.directory / str(step) / "state", self.item_metadata(step), target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore: {e}") from e
        return TrainState(**restored.state), dict(restored.position)

    def item_metadata(self, step: int) -> Any:
        try:
            metadata = self.manager.item_metadata(step).state
        except Exception as e:  # orbax raises several types for unreadable metadata
            raise CheckpointError(f"{self.directory / str(step)}: unreadable checkpoint metadata: {e}") from e
        if metadata is None:
            raise CheckpointError(f"{self.directory / str(step)}: no train state in this checkpoint")
        return metadata

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_compatible(where: Path, saved: Any, target: Any) -> None:
    if (problem := first_mismatch(saved, target)) is not None:
        raise CheckpointError(f"{where}: {problem}")
