"""Checkpoint save/restore, exact resume, one writer per run folder, and the errors for mismatched or broken
checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import pytest

from helpers import TINY, config
from sr_jax.io import FolderLocked, exclusive
from sr_jax.training import loop, restore, trainer
from sr_jax.training.checkpoint import CheckpointError
from train import cli


def _cfg(**model):
    return config(
        TINY, train={"epochs": 2.0, "checkpoint_every": 4, "log_every": 4, "keep_checkpoints": 2}, model=model or {}
    )


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)  # the same structure, and every leaf equal bit for bit


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    cfg = _cfg()
    straight = trainer.build_run(cfg, tmp_path / "straight")
    end = loop.train(straight, restore.initial_state(straight.spec))
    assert int(end.step) == straight.spec.total_steps == 2 * (4096 // 256)

    interrupted = trainer.build_run(cfg, tmp_path / "resumed")
    loop.train(interrupted, restore.initial_state(interrupted.spec), until=13)  # "killed" after step 13
    interrupted.checkpointer.close()
    resumed = trainer.build_run(cfg, tmp_path / "resumed")
    state = restore.restore_or_init(resumed)
    assert int(state.step) == 12  # the last periodic checkpoint
    end_resumed = loop.train(resumed, state)
    _assert_trees_equal(end.params, end_resumed.params)
    _assert_trees_equal(end.opt_state, end_resumed.opt_state)
    assert resumed.checkpointer.manager.all_steps() == [28, 32]  # keep N


def test_save_restore_round_trip_and_position(tmp_path):
    run = trainer.build_run(_cfg(), tmp_path)
    state = loop.train(run, restore.initial_state(run.spec), until=5)
    run.checkpointer.save(5, state, loop.position(run, 5), force=True)
    run.checkpointer.wait()
    restored, position = run.checkpointer.restore(run.spec.program.abstract_state, step=5)
    _assert_trees_equal(state, restored)
    assert position == {"step": 5, "epoch": 0, "batch": 5, "seed": 0, "validation": []}  # no validation yet


def test_mismatched_checkpoint_names_the_parameter_and_both_shapes(tmp_path):
    run = trainer.build_run(_cfg(), tmp_path)
    loop.train(run, restore.initial_state(run.spec), until=4)
    run.checkpointer.close()
    wider = trainer.build_run(_cfg(dim=16), tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"parameter params/l0/id_tables/item has shape \(128, 32\) in the "
        r"checkpoint, \(128, 16\) in the model",
    ):
        wider.checkpointer.restore(wider.spec.program.abstract_state)
    no_adapter = trainer.build_run(_cfg(use_domain_adapter=False), tmp_path)
    with pytest.raises(
        CheckpointError, match=r"checkpoint has parameter params/l1/adapter/\S+ .* that the model lacks"
    ):
        no_adapter.checkpointer.restore(no_adapter.spec.program.abstract_state)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = trainer.build_run(_cfg(), tmp_path)
    loop.train(run, restore.initial_state(run.spec), until=4)
    run.checkpointer.close()
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "state")
    again = trainer.build_run(_cfg(), tmp_path)
    with pytest.raises(CheckpointError, match="checkpoints/4"):
        again.checkpointer.restore(again.spec.program.abstract_state)


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_holder(tmp_path):
    with exclusive(tmp_path):
        with pytest.raises(FolderLocked, match=rf"another process \(pid {os.getpid()} on .*\) is writing this run"):
            trainer.fit(_cfg(), tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before anything was written
    with exclusive(tmp_path):  # released: the next writer takes it
        pass


def test_a_resumed_runs_metrics_have_every_step_once(tmp_path):
    cfg = config(TINY, train={"epochs": 2.0, "checkpoint_every": 4, "log_every": 2})
    run = trainer.build_run(cfg, tmp_path)
    loop.train(run, restore.initial_state(run.spec), until=6)  # "killed" after step 6: last checkpoint at 4
    run.checkpointer.close()
    resumed = trainer.build_run(cfg, tmp_path)
    loop.train(resumed, restore.restore_or_init(resumed), until=8)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def _checkpointed(folder):
    """A run with checkpoints at steps 1 (orbax saves a run's first step), 4 and 8."""
    cfg = config(TINY, train={"epochs": 1.0, "checkpoint_every": 4, "keep_checkpoints": 3})
    run = trainer.build_run(cfg, folder)
    loop.train(run, restore.initial_state(run.spec), until=8)
    run.checkpointer.close()
    return cfg


def _truncate_data(step_folder):
    """Cuts the largest array-data file of a checkpoint step in half: a save cut short."""
    largest = max((p for p in step_folder.rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_that_restores(tmp_path, caplog):
    cfg = _checkpointed(tmp_path / "one")
    _truncate_data(tmp_path / "one" / "checkpoints" / "8")
    resumed = trainer.build_run(cfg, tmp_path / "one")
    with pytest.raises(CheckpointError, match=r"checkpoints/8/state/\S+: changed on disk since .* \(checksum\)"):
        resumed.checkpointer.restore(resumed.spec.program.abstract_state)
    (tmp_path / "one" / "checkpoints" / ".checksums" / "8.json").unlink()  # unsealed: orbax meets the damage
    with pytest.raises(CheckpointError, match=r"checkpoints/8: cannot restore"):
        resumed.checkpointer.restore(resumed.spec.program.abstract_state)  # wrapped, whatever TensorStore raised
    state = restore.restore_or_init(resumed)
    assert int(state.step) == 4 and "skipped a checkpoint that does not restore" in caplog.text
    # a run whose every checkpoint is broken is an error listing each, never a fresh start
    cfg = _checkpointed(tmp_path / "two")
    _truncate_data(tmp_path / "two" / "checkpoints" / "8")
    for step in ("4", "1"):
        shutil.rmtree(tmp_path / "two" / "checkpoints" / step / "state")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)no checkpoint restores:.*checkpoints/8/.*checksum.*checkpoints/4.*checkpoints/1",
    ):
        restore.restore_or_init(trainer.build_run(cfg, tmp_path / "two"))


def test_a_bit_flipped_checkpoint_is_found_and_skipped(tmp_path, caplog):
    """16 bytes flipped inside the largest data file of the latest step (a file of the same size): evaluation,
    fine-tuning and resume refuse it, naming the file; resume falls back to the step before."""
    from sr_jax.training.checkpoint import ParamsReader

    cfg = _checkpointed(tmp_path)
    step8 = tmp_path / "checkpoints" / "8"
    assert json.loads((tmp_path / "checkpoints" / ".checksums" / "8.json").read_text())
    largest = max((p for p in step8.rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
    largest.write_bytes(bytes(data))
    reader = ParamsReader(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=rf"{largest.name}: changed on disk since the checkpoint was saved"):
        reader.restore(8, trainer.build_run(cfg, tmp_path).spec.program.abstract_state.params)
    reader.close()
    state = restore.restore_or_init(trainer.build_run(cfg, tmp_path))
    assert int(state.step) == 4 and "checksum" in caplog.text


def test_restored_parameters_must_be_finite(tmp_path):
    run = trainer.build_run(_cfg(), tmp_path)
    state = loop.train(run, restore.initial_state(run.spec), until=2)
    broken = state._replace(params={**state.params, "l2": jax.tree.map(lambda x: x * jnp.nan, state.params["l2"])})
    run.checkpointer.save(2, broken, loop.position(run, 2), force=True)
    run.checkpointer.wait()
    with pytest.raises(CheckpointError, match=r"checkpoints/2: parameter params/l2/\S+ holds NaN or inf"):
        run.checkpointer.restore(run.spec.program.abstract_state)


def test_sigterm_finishes_the_step_saves_it_and_stops(tmp_path):
    """A pre-empted VM sends SIGTERM: the loop finishes the step it is in, saves it (although no checkpoint
    was due), waits for the save and stops; running again resumes from that step. The signal is sent from
    inside the loop (a wrapped step), not after a wall-clock sleep."""
    cfg = config(TINY, train={"epochs": 1.0, "checkpoint_every": 100, "log_every": 100})
    run = trainer.build_run(cfg, tmp_path)
    compiled, calls = run.compiled_train_step(), []

    def step_then_signal(*args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return compiled(*args)

    run.compiled = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.TrainingInterrupted, match=r"stopped by SIGTERM after step 3, which is saved") as e:
        loop.train(run, restore.initial_state(run.spec))
    assert e.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert run.checkpointer.latest_step() == 3
    run.checkpointer.close()
    resumed = trainer.build_run(cfg, tmp_path)
    assert int(loop.train(resumed, restore.restore_or_init(resumed)).step) == resumed.spec.total_steps == 16


def test_the_cli_exits_with_one_line_and_a_second_signal_stops_at_once(tmp_path):
    def stopped():
        raise loop.TrainingInterrupted("run: stopped by SIGTERM after step 3, which is saved", signal.SIGTERM)

    with pytest.raises(SystemExit) as e:
        cli.interruptible(stopped)
    assert e.value.code == 128 + signal.SIGTERM
    code = (
        "import os, signal\n"
        "from sr_jax.training.loop import stop_requests\n"
        "with stop_requests() as received:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert received == [signal.SIGINT]\n"  # the first: recorded, the process goes on
        "    print('first recorded', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "first recorded\n" and proc.returncode == -signal.SIGINT, (proc.stdout, proc.stderr)


def test_a_waiting_writer_of_a_shared_cache_waits_for_the_holder(tmp_path):
    """Two runs that start together on a fresh synthetic dataset fill its cache one after the other (they
    raced before, and one crashed on the other's half-written text cache)."""
    import threading
    import time

    order = []
    held = threading.Event()

    def holder():
        with exclusive(tmp_path, "cache"):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with exclusive(tmp_path, "cache", wait=True):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_signal_during_the_last_save_stops_the_run_saved_and_resumable(tmp_path):
    """A SIGTERM that arrives while the last step is being saved is not lost: the run stops with the one
    interrupted line (not an evaluation and exit 0), and the same command then finishes it."""
    cfg = config(TINY, train={"epochs": 1.0, "checkpoint_every": 100, "log_every": 100})
    run = trainer.build_run(cfg, tmp_path)
    real_wait, outside = run.checkpointer.wait, []

    def wait_then_signal():
        real_wait()
        if run.checkpointer.latest_step() == run.spec.total_steps and not outside:
            outside.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    run.checkpointer.wait = wait_then_signal
    before = signal.signal(signal.SIGTERM, lambda *a: outside.append("outer handler"))  # as the CLI installs one
    try:
        with pytest.raises(loop.TrainingInterrupted, match=r"stopped by SIGTERM after step 16, which is saved"):
            loop.train(run, restore.initial_state(run.spec))
    finally:
        signal.signal(signal.SIGTERM, before)
    assert outside == [1]  # the loop took the signal, not the handler outside it
    run.close()
    resumed = trainer.build_run(cfg, tmp_path)
    assert int(loop.train(resumed, restore.restore_or_init(resumed)).step) == 16  # done: nothing trained again
    resumed.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_the_loop_says_what_was_interrupted_and_exits_128_plus_it(signum):
    code = (
        "import os, time\n"
        "from train import cli\n"
        f"cli.interruptible(lambda: os.kill(os.getpid(), {int(signum)}) or time.sleep(30))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signum and "Traceback" not in proc.stderr, proc.stderr
    assert f"interrupted by {signal.Signals(signum).name}" in proc.stderr and "run the same command" in proc.stderr


def test_an_unsealed_step_is_not_trusted_by_other_readers(tmp_path):
    """16 flipped bytes in the pretrained step and its checksum record deleted: reading it for fine-tuning,
    evaluation or export is refused (it used to restore the damaged parameters without a word)."""
    from sr_jax.training.checkpoint import ParamsReader

    cfg = _checkpointed(tmp_path)
    step8 = tmp_path / "checkpoints" / "8"
    largest = max((p for p in step8.rglob("*") if p.is_file() and p.parent.name == "d"), key=os.path.getsize)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
    largest.write_bytes(bytes(data))
    (tmp_path / "checkpoints" / ".checksums" / "8.json").unlink()
    with ParamsReader(tmp_path / "checkpoints") as reader, pytest.raises(CheckpointError, match=r"no checksum record"):
        reader.restore(8, trainer.build_run(cfg, tmp_path).spec.program.abstract_state.params)


@pytest.mark.parametrize("damage", ["{", "", "[]", b"\xff\xfe"])
def test_a_damaged_checksum_record_falls_back_like_a_damaged_step(tmp_path, caplog, damage):
    from sr_jax.training.checkpoint import ParamsReader

    cfg = _checkpointed(tmp_path)
    record = tmp_path / "checkpoints" / ".checksums" / "8.json"
    record.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    run = trainer.build_run(cfg, tmp_path)
    with ParamsReader(tmp_path / "checkpoints") as reader, pytest.raises(CheckpointError, match=r"8.json: damaged"):
        reader.restore(8, run.spec.program.abstract_state.params)
    assert int(restore.restore_or_init(run).step) == 4 and "8.json: damaged checksum record" in caplog.text


def test_a_killed_run_s_unsealed_newest_step_resumes_and_is_sealed(tmp_path):
    """A kill between orbax's save and the seal leaves the newest step without a record: the run's own resume
    trusts it (it restores whole and finite) and seals it; an older unsealed step would not be trusted."""
    cfg = _checkpointed(tmp_path)
    (tmp_path / "checkpoints" / ".checksums" / "8.json").unlink()
    run = trainer.build_run(cfg, tmp_path)
    assert int(restore.restore_or_init(run).step) == 8
    assert json.loads((tmp_path / "checkpoints" / ".checksums" / "8.json").read_text())
    (tmp_path / "checkpoints" / ".checksums" / "4.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoints/4: no checksum record"):
        run.checkpointer.restore(run.spec.program.abstract_state, step=4)


def test_sealing_a_step_runs_off_the_training_loop(tmp_path, monkeypatch):
    """The CRC32 seal of the previous step re-reads every file it wrote: a background thread does it, so a save
    returns at once however slow that is; wait() and restore() wait for it, and the record is complete."""
    import time

    from sr_jax.training import checkpoint
    from sr_jax.training.steps import TrainState

    slow_seal = checkpoint.seal

    def slow(*args):
        time.sleep(1.0)
        slow_seal(*args)

    monkeypatch.setattr(checkpoint, "seal", slow)
    state = TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones((64, 8))}, {}, {})
    with checkpoint.Checkpointer(tmp_path / "ckpt", keep=3) as saver:
        saver.save(1, state, {"step": 1}, force=True)
        saver.manager.wait_until_finished()
        started = time.perf_counter()
        saver.save(2, state, {"step": 2}, force=True)  # seals step 1, in the background
        assert time.perf_counter() - started < 0.5
        saver.wait()
        assert {p.name for p in (tmp_path / "ckpt" / checkpoint.CHECKSUMS).iterdir()} == {"1.json", "2.json"}
        restored, position = saver.restore(jax.eval_shape(lambda: state), 1)
        assert position == {"step": 1}
    with checkpoint.BestCheckpoint(tmp_path / "best") as best:  # the validated parameters: the same, off the loop
        started = time.perf_counter()
        best.save(5, state.params, 0.7)
        assert time.perf_counter() - started < 0.5
        best.save(6, state.params, 0.6)  # waits for step 5's seal, kept, then lets step 6 go
        assert best.best() == (5, 0.7)
        assert jnp.array_equal(best.restore(jax.eval_shape(lambda: state.params))["w"], state.params["w"])
        assert {p.name for p in (tmp_path / "best" / checkpoint.CHECKSUMS).iterdir()} == {"5.json"}


def test_a_lock_works_without_flock_and_a_dead_writer_s_lock_is_taken_over(tmp_path, monkeypatch):
    """The writer lock is a file created exclusively (object-store mounts and NFS lack flock), with the holder's
    host and pid: a dead process of this host, or a lock not touched for STALE_S (a writer killed elsewhere),
    no longer blocks; a live writer elsewhere does, named."""
    import json
    import socket
    import time

    from sr_jax import io

    lock = tmp_path / io.LOCK
    lock.write_text("12345\n")  # what the flock version left behind (it never removed its file)
    with exclusive(tmp_path):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with exclusive(tmp_path):  # the dead writer's lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(FolderLocked, match=r"pid 1 on elsewhere"):
        with exclusive(tmp_path):
            pass
    old = time.time() - io.STALE_S - 1
    os.utime(lock, (old, old))  # its heartbeat stopped: that writer died
    with exclusive(tmp_path):
        pass
    monkeypatch.setattr(io, "HEARTBEAT_S", 0.05)
    with exclusive(tmp_path):
        os.utime(tmp_path / io.LOCK, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / io.LOCK).stat().st_mtime < 1  # the holder's heartbeat touched it
