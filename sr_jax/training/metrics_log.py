"""Where a run's training and validation metrics go: `metrics.jsonl` (one JSON line per log interval, for
scripts) and TensorBoard event files in `tensorboard/` (for a person watching curves: `tensorboard --logdir
RUN`). The event files are written by tensorboardX, a maintained pure-Python writer whose only needs are
numpy and protobuf (already here through tensorflow-datasets): no TensorFlow, unlike flax.metrics.tensorboard
and clu's writers. Only process 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensorboardX import SummaryWriter

from sr_jax.io import atomic_file

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLog:
    """Appends to a run's metrics from step `start` on; what was logged past `start` by a run that was killed
    (after the checkpoint it resumes from) is cut from both logs, so each step appears once."""

    def __init__(self, workdir: Path, start: int, write: bool = True):
        self.file = self.writer = None
        if not write:
            return
        cut(workdir / METRICS, start)
        self.file = open(workdir / METRICS, "a")
        self.writer = SummaryWriter(str(workdir / TENSORBOARD), purge_step=start or None, flush_secs=30)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({**metrics, "step": step}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()


def cut(path: Path, step: int) -> None:
    """Drops the lines of metrics.jsonl past `step`."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept))
