"""Multi-host wiring: one process per host (or per GPU), joined by `initialize()` before any JAX computation.

    SR_JAX_COORDINATOR=host:port SR_JAX_NUM_PROCESSES=N SR_JAX_PROCESS_ID=i python -m train.pretrain ...
        (processes on CPU devices also set JAX_PLATFORMS=cpu: their collectives then go over gloo)
    SR_JAX_DISTRIBUTED=auto python -m train.pretrain ...   # TPU pods, SLURM, Open MPI: detected by JAX
    SR_JAX_HEARTBEAT_TIMEOUT=30 ...   # seconds without a heartbeat before a process counts as lost (JAX: 100)

Every process runs the same program. The mesh spans all processes' devices; each process reads only its
rows of every global batch (`sharding.process_rows`); process 0 alone writes the run's files (config,
metrics, reports), while orbax writes checkpoints from all processes together.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("sr_jax")


def _heartbeat_timeout() -> dict:
    """`SR_JAX_HEARTBEAT_TIMEOUT`: how long the survivors of a killed process can wait in a host-side barrier (an
    orbax commit, the coordination service) before they learn of it; a collective on devices learns at once."""
    value = os.environ.get("SR_JAX_HEARTBEAT_TIMEOUT")
    if value is None:
        return {}
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"SR_JAX_HEARTBEAT_TIMEOUT={value!r}: a whole number of seconds >= 1")
    return {"heartbeat_timeout_seconds": int(value)}


def initialize() -> None:
    """Joins the processes named by the environment (above); a single process when none is set."""
    coordinator = os.environ.get("SR_JAX_COORDINATOR")
    if coordinator:
        missing = [v for v in ("SR_JAX_NUM_PROCESSES", "SR_JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"SR_JAX_COORDINATOR={coordinator} is set but {missing} are not")
        if os.environ.get("JAX_PLATFORMS") == "cpu":  # CPU devices talk over gloo; GPUs and TPUs keep their own
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator,
            int(os.environ["SR_JAX_NUM_PROCESSES"]),
            int(os.environ["SR_JAX_PROCESS_ID"]),
            **_heartbeat_timeout(),
        )
    elif os.environ.get("SR_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize(**_heartbeat_timeout())
    else:
        return
    log.info(
        "process %d of %d: %d local devices, %d in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


# What a collective raises on the processes left when another process of the run dies mid-step (its TCP
# connections close) or stops sending heartbeats to the coordinator.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "heartbeat timeout", "unhealthy")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is this process learning that another process of the run stopped (killed, preempted, crashed):
    nothing to fix here, the whole run is restarted and resumes from its newest checkpoint."""
    return (
        jax.process_count() > 1 and isinstance(e, jax.errors.JaxRuntimeError) and any(s in str(e) for s in _PEER_LOST)
    )


def is_primary() -> bool:
    """True on the process that writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective: every process must call it at the same point)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())
