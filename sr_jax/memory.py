"""Per-device memory of a train step, known before the first step runs, and a clear error when it cannot fit.

Parameters and optimizer state are counted exactly from the train state's shapes and shardings (a
row-sharded table costs rows / model-axis per device). Activations and workspace are XLA's own figure for
the compiled step (`memory_analysis().temp_size_in_bytes`), so nothing is guessed; the batch and the text
table are the step's other inputs. Capacity is the accelerator's `bytes_limit`, or on CPU the host's
memory shared by its devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

GiB = 1024**3


class OutOfMemoryError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    params: int
    optimizer: int  # optimizer state, and the row-sparse rule's per-row state
    inputs: int  # the batch and the text table
    temporaries: int | None  # activations and workspace of the compiled step (None: the backend does not say)
    capacity: int | None  # what one device has (None: unknown)

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.inputs + (self.temporaries or 0)

    def table(self) -> str:
        def gib(b):
            return "n/a" if b is None else f"{b / GiB:.3f} GiB"

        rows = [("parameters", self.params), ("optimizer state", self.optimizer), ("batch + text table", self.inputs)]
        rows += [("activations + workspace (XLA)", self.temporaries), ("total", self.total)]
        rows += [("device capacity", self.capacity)]
        return "\n".join(f"  {name:<30} {gib(b):>12}" for name, b in rows)


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def device_capacity(device: jax.Device, devices_in_use: int | None = None) -> int | None:
    """Bytes one device can hold: the accelerator's limit, or on CPU the host's memory shared by the devices
    in use on this host (default: all of them)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        sharing = devices_in_use or jax.local_device_count()
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, sharing)
    return None


def estimate(abstract_state: Any, inputs: Any, compiled: Any = None) -> MemoryEstimate:
    """`abstract_state`: a TrainState of ShapeDtypeStructs with shardings; `inputs`: the step's other
    arguments (batch, text), abstract or concrete; `compiled`: the compiled step, for XLA's temporaries."""
    temporaries = None
    if compiled is not None:
        analysis = compiled.memory_analysis()
        temporaries = None if analysis is None else int(analysis.temp_size_in_bytes)
    optimizer = (abstract_state.opt_state, abstract_state.tables_state)
    return MemoryEstimate(
        params=per_device_bytes(abstract_state.params),
        optimizer=per_device_bytes(optimizer),
        inputs=per_device_bytes(inputs),
        temporaries=temporaries,
        capacity=device_capacity(jax.local_devices()[0]),
    )


TRAINING_ADVICE = (
    "Shard the embedding tables over more devices (mesh.model), hash ids into fewer rows (model.id_buckets), "
    "lower data.batch_size, or use train.embedding_update=rowwise_adagrad (one accumulator per row instead "
    "of Adam's two moments)."
)


def check(estimate: MemoryEstimate, what: str, headroom: float = 0.95, advice: str = TRAINING_ADVICE) -> None:
    """OutOfMemoryError when the estimate exceeds `headroom` of a device's capacity, with the breakdown and
    `advice`: the knobs that help."""
    if estimate.capacity is None or estimate.total <= headroom * estimate.capacity:
        return
    raise OutOfMemoryError(
        f"{what} needs about {estimate.total / GiB:.2f} GiB per device but a device has "
        f"{estimate.capacity / GiB:.2f} GiB:\n{estimate.table()}\n{advice}"
    )
