"""Malformed input, one case per row of docs/RELIABILITY.md: each is an error that names the file, the field
and the row (or the key), and nothing is written."""

import json
import shutil

import numpy as np
import pytest

from sr_jax.config import ConfigError, load_config
from sr_jax.data.importer import import_tables
from sr_jax.data.store import DatasetError, open_dataset
from test_importer import ITEMS, _source

IMPORTER_CASES = {
    "header-only impressions": (
        {"impressions": "split,domain,user_id,item_id,label\n"},
        r"impressions.csv: no rows \(only a header\)",
    ),
    "a column named twice": (
        {"impressions": "split,domain,user_id,item_id,label,label\ntrain,feed,u1,A7,1,1\n"},
        r"impressions.csv, field 'label': column appears more than once",
    ),
    "a ragged row": (
        {"impressions": "split,domain,user_id,item_id,label\ntrain,feed,u1,A7,1\ntrain,feed,u1\n"},
        r"impressions.csv, row 1: a row of another number of cells than the header's 5",
    ),
    "a timestamp that is not an integer": (
        {"impressions": "split,domain,user_id,item_id,label,timestamp\ntrain,feed,u1,A7,1,10\ntest,feed,u1,A7,0,abc\n"},
        r"impressions.csv, field 'timestamp', row 1: 'abc' is not an integer",
    ),
    "a timestamp past int64": (
        {"impressions": "split,domain,user_id,item_id,label,timestamp\ntrain,feed,u1,A7,1,99999999999999999999\n"},
        r"field 'timestamp', row 0: '99999999999999999999' is not an integer of at most 18 digits",
    ),
}


@pytest.mark.parametrize("case", list(IMPORTER_CASES))
def test_importer_names_what_is_wrong(tmp_path, case):
    tables, message = IMPORTER_CASES[case]
    with pytest.raises(DatasetError, match=message):
        import_tables(_source(tmp_path, **tables), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_importer_names_the_row_of_a_byte_that_is_not_utf8_and_reads_huge_cells(tmp_path):
    src = _source(tmp_path / "a")
    (src / "items.csv").write_bytes(ITEMS.encode() + b"Z1,caf\xe9 latte,acme,\n")
    with pytest.raises(DatasetError, match=r"items.csv, row 3: not UTF-8 text \(byte 0xe9\)"):
        import_tables(src, tmp_path / "a/out")
    src = _source(tmp_path / "b")
    (src / "items.csv").write_text(ITEMS + "Z2," + "word " * 800_000 + ",acme,\n")  # a 4 MB cell
    assert max(len(t) for t in import_tables(src, tmp_path / "b/out").texts()) > 3_000_000


@pytest.fixture
def dataset(tmp_path):
    return import_tables(_source(tmp_path), tmp_path / "ds").root


def test_store_names_wrong_types_bad_bytes_and_truncated_arrays(dataset, tmp_path):
    from sr_jax.text import HashedBagOfWords, build_text_cache

    meta = json.loads((dataset / "meta.json").read_text())
    for field, value in (("vocab", "many"), ("splits", ["train"]), ("num_texts", "5")):
        broken = tmp_path / f"meta-{field}"
        shutil.copytree(dataset, broken)
        (broken / "meta.json").write_text(json.dumps({**meta, field: value}))
        with pytest.raises(DatasetError, match=rf"meta.json, field '{field}': wrong type or value"):
            open_dataset(broken)
    texts = tmp_path / "texts"
    shutil.copytree(dataset, texts)
    (texts / "texts.jsonl").write_bytes((texts / "texts.jsonl").read_bytes() + b'"caf\xe9"\n')
    with pytest.raises(DatasetError, match=r"texts.jsonl, field 'text', row \d+: not UTF-8 text"):
        open_dataset(texts)
    build_text_cache(dataset, HashedBagOfWords(), progress=False)
    pooled = dataset / "text_cache/hashed-bow/pooled.npy"
    pooled.write_bytes(pooled.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"pooled.npy, field 'pooled': unreadable array \(truncated"):
        open_dataset(dataset)
    with pytest.raises(DatasetError, match=r"pooled.npy, field 'pooled': unreadable array"):
        open_dataset(dataset, check=False).text_cache("hashed-bow")
    assert np.load(dataset / "splits/train/label.npy").size > 0  # the rest is untouched


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"data": 5}', "\udcff"])
def test_a_garbage_config_json_names_its_file(tmp_path, garbage):
    path = tmp_path / "config.json"
    path.write_text(garbage, errors="surrogateescape")
    with pytest.raises(ConfigError, match=rf"{path}: "):
        load_config(path)


def test_an_entry_point_ends_a_user_error_with_one_line_and_status_1(tmp_path):
    import subprocess
    import sys

    (tmp_path / "run").mkdir()
    (tmp_path / "run/config.json").write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "train.evaluate", "--workdir", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {tmp_path / 'run/config.json'}: not a saved config" in done.stderr
