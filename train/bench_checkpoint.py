"""What a checkpoint costs the training loop:
`python -m train.bench_checkpoint [--gib G] [--saves N] [--between S] [--out FILE]`.

Saves a train state of G GiB (float32 parameters, no optimizer state) N + 1 times through the trainer's
`Checkpointer`, every save as the loop makes it, and times each `save` call: the loop's stall. Orbax writes in
the background; sealing the previous step (the CRC32 of every file it wrote, `checkpoint.seal`) runs on a
background thread, so neither grows with the checkpoint. Then times the seal of one step alone (what the loop
would wait for if it sealed inline) and `wait()` (the end of a run). Prints and writes one JSON record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from sr_jax.training.checkpoint import Checkpointer, _files
from sr_jax.training.steps import TrainState


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--between", type=float, default=10.0, help="seconds of 'training' between two saves")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    leaves = 16
    rows = int(args.gib * 2**30 / 4 / leaves / 256)
    keys = jax.random.split(jax.random.key(0), leaves)  # random: incompressible, as trained weights are
    params = {f"w{i}": jax.random.normal(keys[i], (rows, 256), jnp.float32) for i in range(leaves)}
    state = TrainState(jnp.zeros((), jnp.int32), params, {}, {})
    folder = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    stalls = []
    try:
        with Checkpointer(folder / "checkpoints", keep=2, every=1) as checkpointer:
            for step in range(1, args.saves + 2):
                jax.block_until_ready(state)
                started = time.perf_counter()
                checkpointer.save(step, state, {"step": step}, force=True)
                stalls.append(time.perf_counter() - started)
                time.sleep(args.between)  # the steps between two saves: orbax finishes writing meanwhile
            started = time.perf_counter()
            checkpointer.wait()
            wait = time.perf_counter() - started
            started = time.perf_counter()
            _files(folder / "checkpoints" / str(args.saves + 1))  # one step's CRC32s, inline
            seal = time.perf_counter() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record = {
        "gib": args.gib,
        "first_save_s": round(stalls[0], 3),  # nothing to seal yet
        "save_stall_s": [round(s, 3) for s in stalls[1:]],  # each seals the step before it
        "seal_one_step_s": round(seal, 3),
        "wait_s": round(wait, 3),
        "devices": [d.device_kind for d in jax.devices()][:1],
    }
    print(json.dumps(record))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
