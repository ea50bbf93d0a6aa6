"""No command deletes or replaces what it did not write, and a folder holds one run (issue 38).

Every command that takes an output path (`--out`, `--dst`, a positional OUT) writes it only where it is missing,
an empty folder, or that command's own earlier output (its `.sr-jax.json` mark, or a file's kind in its
metadata); anything else (a user's folder, a training run, another kind of output) is refused in one line naming
the path and `--overwrite`, and left exactly as it was. `--overwrite` never replaces a command's input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, config
from sr_jax import io
from sr_jax.training import trainer
from sr_jax.training.checkpoint import CheckpointError
from train import convert, embed, export, finetune, predict, prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("outputs") / "run"
    trainer.fit(config(TINY, train={"epochs": 1.0}), workdir)
    return workdir


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The smallest tables `train.prepare tables` imports."""
    src = tmp_path_factory.mktemp("tables")
    (src / "domains.csv").write_text("name,task\nfeed,rec\n")
    rows = [f"{'train' if i % 4 else 'test'},feed,u{i % 5},i{i % 7},{i % 2}" for i in range(40)]
    (src / "impressions.csv").write_text("split,domain,user_id,item_id,label\n" + "\n".join(rows) + "\n")
    return src


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or `path` itself) by relative name, with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _writers(run: Path, tables: Path, tmp_path: Path) -> dict:
    state = tmp_path / "state.safetensors"
    return {
        "prepare tables": lambda out: prepare.main(["tables", "--src", str(tables), "--out", out, "--encoder", "none"]),
        "convert params": lambda out: convert.main(["params", str(run), out]),
        "convert to-safetensors": lambda out: convert.main(["to-safetensors", str(run), out]),
        "convert to-torch": lambda out: convert.main(["to-torch", str(run), out]),
        "convert from-torch": lambda out: convert.main(["from-torch", str(state), "--like", str(run), "--out", out]),
        "convert hf-to-orbax": lambda out: convert.main(["hf-to-orbax", "--src", "all-MiniLM-L6-v2", "--dst", out]),
        "export": lambda out: export.main(["--workdir", str(run), "--out", out, "--platforms", "cpu"]),
        "embed": lambda out: embed.main(["--workdir", str(run), "--out", out]),
        "predict": lambda out: predict.main(["--workdir", str(run), "--out", out]),
    }


WRITERS = [
    "prepare tables", "convert params", "convert to-safetensors", "convert to-torch", "convert from-torch",
    "convert hf-to-orbax", "export", "embed", "predict",
]  # fmt: skip


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_a_user_folder_and_a_run_folder_and_keeps_them(run, tables, tmp_path, writer):
    """Issue 38: `prepare tables`, `convert params` and `from-torch` replaced such folders (exit 0), `export` and
    `embed` deleted them ("replaced if it exists"). Now each is refused before anything is read or written."""
    write = _writers(run, tables, tmp_path)[writer]
    user = tmp_path / "mine"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "plan.txt").write_text("months of work")
    user_file = tmp_path / "mine.parquet"
    user_file.write_bytes(b"a user's own file")
    other_run = tmp_path / "other-run"
    shutil.copytree(run, other_run)
    for target in (user, user_file, other_run):
        before = snapshot(target)
        with pytest.raises(io.OutputExists, match=rf"{re.escape(str(target))}: holds .*--overwrite"):
            write(str(target))
        assert snapshot(target) == before, f"{writer} changed {target}"


def test_a_command_replaces_its_own_output_and_overwrite_replaces_anything_but_an_input(run, tables, tmp_path):
    out = tmp_path / "params"
    convert.main(["params", str(run), str(out)])
    assert io.kind_of(out) == io.PARAMS_RUN
    (out / "stale").write_text("from the first conversion")
    convert.main(["params", str(run), str(out)])  # its own earlier output: replaced
    assert not (out / "stale").exists() and (out / "checkpoints").is_dir()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "plan.txt").write_text("mine")
    prepare.main(["tables", "--src", str(tables), "--out", str(user), "--encoder", "none", "--overwrite"])
    assert (user / "meta.json").exists() and not (user / "plan.txt").exists()  # asked for: replaced
    before = snapshot(run)
    for argv in (["params", str(run), str(run), "--overwrite"], ["params", str(run), str(run.parent), "--overwrite"]):
        with pytest.raises(io.OutputExists, match="which this command reads"):
            convert.main(argv)
    assert snapshot(run) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    convert.main(["to-safetensors", str(run), str(empty / "p.safetensors")])
    convert.main(["to-safetensors", str(run), str(empty / "p.safetensors")])  # its own file: replaced
    assert io.kind_of(empty / "p.safetensors") == "parameters (safetensors)"


def test_the_refusal_is_one_line_naming_the_folder_and_overwrite(run, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "plan.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "train.export", "--workdir", str(run), "--out", str(user)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {user}: holds files this command did not write") and "--overwrite" in last
    assert (user / "plan.txt").read_text() == "mine"


def test_a_run_never_starts_in_a_folder_that_holds_something_else(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "eval.json").write_text('{"mine": true}')
    with pytest.raises(io.OutputExists, match="choose another --workdir"):
        trainer.fit(config(TINY, train={"epochs": 1.0}), user)
    assert snapshot(user) == {"eval.json": b'{"mine": true}'}


def test_a_folder_holds_one_kind_of_fine_tune(run, tmp_path):
    """Issue 38: a plain fine-tune's folder then `--strategy auto` replaced its eval.json (exit 0); an auto folder
    then `--strategy all` put a second run beside the selection. Both are refused, the folder unchanged."""
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    before = snapshot(plain)
    with pytest.raises(io.OutputExists, match="holds a run, not the strategy selection"):
        finetune.main(["--pretrained", str(run), "--workdir", str(plain), "--strategy", "auto"])
    assert snapshot(plain) == before
    selection = tmp_path / "auto"
    (selection / "candidates" / "scratch").mkdir(parents=True)
    (selection / "strategy.json").write_text(json.dumps({"chosen": "scratch"}))  # what auto leaves
    before = snapshot(selection)
    with pytest.raises(io.OutputExists, match="holds a strategy selection, not the run"):
        finetune.main(["--pretrained", str(run), "--workdir", str(selection), "--strategy", "all"])
    assert snapshot(selection) == before


def test_a_run_resumed_with_allow_changes_records_each_change(tmp_path):
    cfg = config(TINY, train={"epochs": 1.0})
    trainer.fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "changes.jsonl").exists()
    more = config(TINY, train={"epochs": 1.5})
    trainer.fit(more, tmp_path / "run")  # what `--allow-changes` lets through
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "changes.jsonl").read_text().splitlines()]
    assert line["changed"] == {"train.epochs": [1.0, 1.5]}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["epochs"] == 1.5


@pytest.mark.parametrize("reader", ["export", "predict", "evaluate", "convert", "finetune"])
def test_every_reader_names_each_parameter_a_checkpoint_lacks(run, tmp_path, reader):
    """A run saved by an older model (issue 38: a STAR run from before its update counts; here the same run read by
    a model with one expert more): export and predict raised a raw TypeError, evaluate an orbax error naming no
    parameter. Every reader names each parameter, with both shapes, in one CheckpointError."""
    from train import evaluate

    old = tmp_path / "old"
    shutil.copytree(run, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["model"]["num_experts"] += 1
    (old / "config.json").write_text(json.dumps(cfg))
    call = {
        "export": lambda: export.main(["--workdir", str(old), "--out", str(tmp_path / "served")]),
        "predict": lambda: predict.main(["--workdir", str(old), "--out", str(tmp_path / "p.parquet")]),
        "evaluate": lambda: evaluate.main(["--workdir", str(old)]),
        "convert": lambda: convert.main(["to-safetensors", str(old), str(tmp_path / "p.safetensors")]),
        "finetune": lambda: finetune.main(["--pretrained", str(old), "--workdir", str(tmp_path / "ft")]),
    }[reader]
    with pytest.raises(CheckpointError, match=r"parameter (params/)?l1/backbone/.* has shape .* in the checkpoint"):
        call()
