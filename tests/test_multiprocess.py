"""Two processes on this machine (CPU, localhost coordinator) train as one: the same global batches, the
same result as one process, files written once."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, config
from sr_jax.training import trainer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 1.0, "checkpoint_every": 8, "log_every": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _overrides() -> list[str]:
    cfg = config(TINY, train=TRAIN)
    synthetic = [f"data.synthetic.{f.name}={getattr(TINY, f.name)}" for f in dataclasses.fields(TINY)]
    return [
        *synthetic,
        f"data.text_encoder={cfg.data.text_encoder}",
        f"data.batch_size={cfg.data.batch_size}",
        f"data.eval_batch_size={cfg.data.eval_batch_size}",
        *[f"train.{k}={v}" for k, v in TRAIN.items()],
        "mesh.data=2",
        "mesh.model=2",  # tables row-sharded inside each process, the batch split across them
    ]


def test_two_processes_train_like_one(tmp_path):
    single = trainer.fit(config(TINY, train=TRAIN), tmp_path / "single")  # also generates the dataset
    workdir, port = tmp_path / "two", _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        SR_JAX_COORDINATOR=f"localhost:{port}",
        SR_JAX_NUM_PROCESSES="2",
    )
    command = [sys.executable, "-m", "train.pretrain", "--workdir", str(workdir), *_overrides()]
    procs = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(env, SR_JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two-process run did not finish in 5 minutes")
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    assert "process 1 of 2: 2 local devices, 4 in all" in outputs[1]
    assert "mesh {'data': 2, 'model': 2}" in outputs[0]
    two = json.loads((workdir / "eval.json").read_text())
    assert abs(two["mean_domain_auc"] - single["mean_domain_auc"]) < 2e-4
    assert abs(two["overall"]["log_loss"] - single["overall"]["log_loss"]) < 2e-4
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 16 // 4  # written by process 0 only: one line per log interval
    steps = {p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    assert {"8", "16"} <= steps  # saved by both processes together (orbax)
