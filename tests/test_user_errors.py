"""Nothing that cannot run is written, and a user's mistake ends in one line: the cases of the second fault round
(issue 27) that are about configs and reports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from helpers import TINY, config
from sr_jax.config import ConfigError, save_config
from sr_jax.training import trainer


@pytest.mark.parametrize(
    "change, match",
    [
        ({"data": {"eval_split": "tset"}}, r"data.eval_split='tset'"),
        ({"data": {"train_split": "trian"}}, r"data.train_split='trian'"),
        ({"mesh": {"data": 16}}, r"mesh.data=16 x mesh.model=1 needs 16 devices; there are 8"),
    ],
)
def test_a_config_that_cannot_run_never_replaces_the_saved_one(tmp_path, change, match):
    """A bad split or a mesh the devices do not hold fails before config.json is written: a fresh folder gets
    none, and a resumed one keeps the config it had (which every later plain command reads)."""
    good = config(TINY, train={"epochs": 1.0})
    sections = {name: dataclasses.replace(getattr(good, name), **values) for name, values in change.items()}
    bad = dataclasses.replace(good, **sections)
    with pytest.raises(ConfigError, match=match):
        trainer.fit(bad, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "config.json").exists()
    (tmp_path / "resumed").mkdir()
    save_config(good, tmp_path / "resumed" / "config.json")
    saved = (tmp_path / "resumed" / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=match):
        trainer.fit(bad, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "config.json").read_bytes() == saved


def test_the_cli_says_a_bad_mesh_in_one_line(tmp_path):
    args = ["--workdir", str(tmp_path / "run"), "mesh.data=3", "data.text_encoder=hashed-bow"]
    args += [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    done = subprocess.run([sys.executable, "-m", "train.pretrain", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: mesh.data=3 x mesh.model=1 needs 3 devices")
    assert not (tmp_path / "run" / "config.json").exists()


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


def test_user_errors_end_in_one_line_not_a_traceback(tmp_path):
    """A missing run folder, a damaged config.json and an existing output each end with `error: ...` naming the
    path, and exit 1."""
    missing = _cli("train.evaluate", "--workdir", str(tmp_path / "nowhere"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"data": ')
    damaged = _cli("train.evaluate", "--workdir", str(tmp_path / "broken"))
    for done, path in ((missing, tmp_path / "nowhere"), (damaged, tmp_path / "broken" / "config.json")):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(path) in last, last


def test_a_full_disk_names_the_path_and_the_free_space(tmp_path):
    import errno

    from train import cli

    line = cli.one_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "eval.json")))
    assert line.startswith(f"no space left on the device writing {tmp_path / 'run' / 'eval.json'} (")
    assert f"MiB free in {tmp_path})" in line


def test_a_full_disk_in_a_storage_layer_or_a_file_object_names_the_path_written(tmp_path):
    """Issue 38: TensorStore's full disk is a ValueError naming the file in quotes; numpy and pyarrow raise ENOSPC
    without a file name, which named `.` and the free space of the wrong folder (predict, export)."""
    import errno

    from sr_jax import io
    from train import cli

    message = (
        'RESOURCE_EXHAUSTED: Error writing "params.l0/0" in OCDBT database at local file "/x/ckpt/1/": Failed writing:'
        f' "{tmp_path}/run/checkpoints/1/d/abc": Failed to write 16286 bytes to file 9: No space left on device '
        "[os_error_code='28']"
    )
    line = cli.one_line(ValueError(message))
    assert line.startswith(f"no space left on the device writing {tmp_path}/run/checkpoints/1/d/abc (")
    assert f"MiB free in {tmp_path})" in line
    assert cli.one_line(ValueError("RESOURCE_EXHAUSTED: too many")) == "RESOURCE_EXHAUSTED: too many"
    folder, file = tmp_path / "out", tmp_path / "out.npz"
    for final, writer in ((folder, lambda final: io.atomic_dir(final, "a test's output")), (file, io.atomic_file)):
        with pytest.raises(OSError) as raised, writer(final):
            raise OSError(errno.ENOSPC, "No space left on device")  # as np.savez to a file object raises it
        assert raised.value.filename == str(final)


def test_errors_of_background_threads_are_one_line_while_a_command_runs(capfd, caplog):
    """A failed checkpoint write made orbax's threads print 4 to 104 tracebacks before the command's own error."""
    import asyncio
    import logging
    import threading

    from train import cli

    def fail():
        raise RuntimeError("Event loop is closed")

    def callback():  # a C++ callback into Python prints its error through sys.excepthook
        try:
            fail()
        except RuntimeError:
            sys.excepthook(*sys.exc_info())

    hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
    with caplog.at_level(logging.DEBUG), cli.background_errors_in_one_line():
        for target in (fail, callback):
            thread = threading.Thread(target=target, name="writer")
            thread.start()
            thread.join()
        try:
            fail()
        except RuntimeError:
            logging.getLogger("absl").exception("_SignalingThread.run() raised an exception")
            logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
        loop = asyncio.new_event_loop()
        loop.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Traceback" not in caplog.text, err + caplog.text
    assert "in thread writer: Event loop is closed" in caplog.text
    assert "_SignalingThread.run() raised an exception (Event loop is closed)" in caplog.text
    assert (threading.excepthook, sys.excepthook, sys.unraisablehook) == hooks  # restored


def test_a_full_disk_during_training_ends_in_one_line(tmp_path):
    """The real thing, on a 600 KiB tmpfs (where this machine lets the test mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        args = ["--workdir", str(disk / "run"), "data.text_encoder=hashed-bow", "mesh.data=1", "train.epochs=2"]
        args += [f"data.synthetic.{k}={v}" for k, v in TINY.__dict__.items()]
        done = subprocess.run([sys.executable, "-m", "train.pretrain", *args], capture_output=True, text=True)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the device writing {disk}/run") and "MiB free in" in last


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.synthetic.cold_item_fraction=nan", "data.synthetic.cold_item_fraction"),
        ("data.synthetic.cold_item_fraction=1.5", "data.synthetic.cold_item_fraction"),
        ("data.synthetic.num_topics=5", "data.synthetic.num_topics"),
        ("data.synthetic.train_examples=-5", "data.synthetic.train_examples"),
        ("data.synthetic.num_users=0", "data.synthetic.num_users"),
        ("data.synthetic.seed=-1", "data.synthetic.seed"),
        ("train.epochs=1e30", "train.epochs"),
        ("data.text_encoder=", "data.text_encoder"),
    ],
)
def test_values_are_validated_naming_their_key(override, key):
    from sr_jax.config import Config, override as apply, validate

    with pytest.raises(ConfigError, match=rf"{key}: "):
        validate(apply(Config(), [override]))


def test_the_generator_has_the_topics_the_config_says():
    from sr_jax.config import SYNTHETIC_TOPICS
    from sr_jax.data import synthetic

    assert len(synthetic.TOPICS) == SYNTHETIC_TOPICS


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_writer_s_temporaries_are_removed_by_the_next_writer(tmp_path):
    """`.NAME.tmp-PID@HOST...` siblings of a file or folder that a killed writer on this host left go when the
    same file or folder is written again; a live writer's and another host's stay."""
    from sr_jax import io

    host = io._writer().split("@")[1]
    dead, live = _dead_pid(), os.getpid()
    stale_dir = tmp_path / f".data.tmp-{dead}@{host}~abc"
    stale_file = tmp_path / f".job.tmp-{dead}@{host}.json"
    kept = [tmp_path / f".data.tmp-{live}@{host}~def", tmp_path / f".job.tmp-{dead}@elsewhere-host.json"]
    stale_dir.mkdir()
    stale_file.write_text("{")
    kept[0].mkdir()
    kept[1].write_text("{")
    with io.atomic_dir(tmp_path / "data", io.DATASET) as tmp:
        (tmp / "x").write_text("1")
    with io.atomic_file(tmp_path / "job.json") as tmp:
        tmp.write_text("{}")
    assert not stale_dir.exists() and not stale_file.exists() and all(p.exists() for p in kept)
    assert (tmp_path / "data" / "x").read_text() == "1" and (tmp_path / "job.json").read_text() == "{}"


def test_a_half_written_job_record_starts_the_job_again(tmp_path):
    from sr_jax.export import scoring

    parts = tmp_path / "scores.parquet.parts"
    parts.mkdir()
    (parts / "job.json").write_text('{"source": "ru')  # a kill while the record was written
    (parts / "part-00000.parquet").write_text("not a part of this job")
    job = {"source": "run", "rows": 3}
    scoring._start_parts(parts, job, overwrite=False)
    assert json.loads((parts / "job.json").read_text()) == job and not (parts / "part-00000.parquet").exists()
