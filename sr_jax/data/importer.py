"""Your own data into the dataset store, without code: a folder of tables, CSV or Parquet.

    SRC/domains.{csv,parquet}      name, task (search | rec), pretrain (optional: true/false, default true)
    SRC/impressions.{csv,parquet}  split, domain (a name from domains), user_id, item_id, label (0/1),
                                   query_id (optional; empty for recommendation examples), timestamp (optional, integer)
                                   Without `label` the rows are clicks (implicit feedback): `negatives` sampled
                                   non-clicks follow each (`sr_jax.data.negatives`)
    SRC/items.{csv,parquet}        optional: item_id, text (optional), item.FIELD ... (categorical features),
                                   item.dense.FIELD ... (numbers: dense features)
    SRC/users.{csv,parquet}        optional: user_id, user.FIELD ..., user.dense.FIELD ...
    SRC/queries.{csv,parquet}      optional: query_id, text

Ids are any strings or integers, read as written: every CSV column is read as text, so `007` and `7`, or
`1.0` and `1`, are different ids (pyarrow's type inference would merge them); they become rows 1..n in
sorted order (0 = missing), and the store keeps every row's key (`keys.json`). A FIELD value
may hold several values separated by "|" (a multi-valued field). Texts are stored once each; an
item or query without text has none (-1). A dense FIELD holds a number (empty: missing); the store keeps it
standardised with the statistics of the `train` split's impressions (their mean and std, in meta.json), so
validation and test rows never shape it. Every problem is a `DatasetError` naming the file, the
column and the row (data rows counted from 0, the header excluded). Reading uses pyarrow (vectorised:
no Python loop over rows), which tensorflow-datasets already brings.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sr_jax.data import negatives
from sr_jax.data.schema import FLOAT32_MAX, TASKS, DatasetMeta, DenseField, DenseOverflow, Domain, SparseField
from sr_jax.data.store import Dataset, DatasetError, write_dataset

MULTI_SEPARATOR = "|"
TABLES = ("domains", "impressions", "items", "users", "queries")


class _Table:
    """One input table and the file it came from, with checked column access."""

    def __init__(self, file: Path, table: pa.Table):
        self.file, self.table = file, table

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def has(self, column: str) -> bool:
        return column in self.table.column_names

    def strings(self, column: str, required: bool = True) -> pa.ChunkedArray | None:
        """The column as strings; a missing column or (when required) an empty value is an error."""
        if not self.has(column):
            if required:
                raise DatasetError(self.file, column, None, f"missing column (the file has {self.table.column_names})")
            return None
        values = pc.cast(self.table[column], pa.string())
        empty = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
        if required and pc.any(empty).as_py():
            raise DatasetError(self.file, column, _first(empty), "empty value")
        return pc.if_else(empty, pa.scalar(None, pa.string()), values)

    def unique_ids(self, column: str) -> pa.ChunkedArray:
        ids = self.strings(column)
        counts = pc.value_counts(ids)
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated):
            row = _first(pc.equal(ids, repeated[0]))
            raise DatasetError(self.file, column, row, f"id {repeated[0].as_py()!r} appears more than once")
        return ids


def _first(mask) -> int:
    return int(np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))[0])


def _read(src: Path, name: str, required: bool) -> _Table | None:
    found = [p for p in (src / f"{name}.csv", src / f"{name}.parquet") if p.exists()]
    if not found:
        if required:
            raise DatasetError(src / f"{name}.csv", None, None, "missing (a .csv or .parquet table is required)")
        return None
    if len(found) > 1:
        raise DatasetError(found[0], None, None, f"both {found[0].name} and {found[1].name} exist: keep one")
    file = found[0]
    try:
        table = pq.read_table(file) if file.suffix == ".parquet" else _read_csv_as_text(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(file, None, None, f"unreadable table: {e}") from e
    names = table.column_names
    if repeated := sorted({c for c in names if names.count(c) > 1}):
        raise DatasetError(file, repeated[0], None, f"column appears more than once in the header {names}")
    return _Table(file, table)


def _read_csv_as_text(file: Path) -> pa.Table:
    """Every column as strings, exactly as written: inferring types would turn ids like 007 and 7, 1.0 and 1,
    or large integers differing past float precision into one value; only an empty cell is missing (`NA`,
    `null` and `None` are strings like any other), and a UTF-8 byte-order mark before the header is not part
    of the first column's name. One pass over the bytes first checks
    UTF-8 (naming the row of a bad byte) and sizes pyarrow's blocks to the longest line (a cell of several
    MiB does not fit the default block); a row with another number of cells is named too."""
    longest = _check_utf8(file)
    with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not in the header
        header = next(csv.reader(f), [])
    bad: list[int | None] = []

    def invalid(row) -> str:
        bad.append(None if row.number is None else row.number - 2)  # 1-based, header included
        return "error"

    try:
        return pa_csv.read_csv(
            file,
            read_options=pa_csv.ReadOptions(block_size=max(1 << 20, 2 * longest), use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()), strings_can_be_null=True, null_values=[""]
            ),
        )
    except pa.ArrowInvalid as e:
        if bad:
            raise DatasetError(
                file, None, bad[0], f"a row of another number of cells than the header's {len(header)}"
            ) from e
        raise


def _check_utf8(file: Path) -> int:
    """The longest line's length in bytes; a DatasetError naming the row of the first byte that is not UTF-8."""
    longest = 0
    with open(file, "rb") as f:
        for line_number, line in enumerate(f):
            longest = max(longest, len(line))
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                row = line_number - 1 if line_number else None
                raise DatasetError(
                    file, None, row, f"not UTF-8 text (byte {line[e.start]:#x}): save it as UTF-8"
                ) from None
    return longest


def _vocab(*arrays) -> pa.Array:
    """Sorted distinct non-empty ids of all `arrays`: id i + 1 is row i of this array."""
    values = pa.chunked_array([c for a in arrays if a is not None for c in pc.drop_null(a).chunks], pa.string())
    distinct = pc.unique(values)
    return distinct.take(pc.sort_indices(distinct))


def _index(values: pa.ChunkedArray, vocab: pa.Array) -> np.ndarray:
    """Row numbers (1-based; 0 for empty) of `values` in `vocab`."""
    found = pc.index_in(values, value_set=vocab)
    return pc.fill_null(pc.add(found, 1), 0).to_numpy().astype(np.int32)


def _fields(table: _Table, side: str, dense: bool) -> list[tuple[str, str]]:
    """(column, field name) of the table's `side.FIELD` (or, `dense`, `side.dense.FIELD`) columns; a name that
    cannot be a field (empty, or a path: it names the column's file in the store) is a DatasetError."""
    out = []
    for column in table.table.column_names:
        if not column.startswith(f"{side}.") or column.startswith(f"{side}.dense.") != dense:
            continue
        name = column[len(f"{side}.dense." if dense else f"{side}.") :]
        if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise DatasetError(table.file, column, None, f"the field name {name!r} is empty, or a path")
        out.append((column, name))
    return out


def _sparse(table: _Table | None, side: str, key: pa.ChunkedArray | None, vocab: pa.Array):
    """Each `side.FIELD` column: (SparseField, [len(vocab) + 1, ...] value rows per entity id, its values' keys)."""
    if table is None:
        return []
    rows = _index(key, vocab)  # entity row in the table -> id
    out = []
    for column, name in _fields(table, side, dense=False):
        values = table.strings(column, required=False)
        parts = pc.split_pattern(pc.fill_null(values, ""), MULTI_SEPARATOR)
        lengths = pc.list_value_length(parts).to_numpy()
        flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
        tokens = _vocab(pc.if_else(pc.equal(flat, ""), pa.scalar(None, pa.string()), flat))
        codes = _index(pa.chunked_array([flat]), tokens)
        max_len = max(1, int(lengths.max(initial=1)))
        per_row = np.zeros((table.rows, max_len), np.int32)
        positions = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        per_row[np.repeat(np.arange(table.rows), lengths), positions] = codes
        per_id = np.zeros((len(vocab) + 1, max_len), np.int32)
        per_id[rows] = per_row
        field = SparseField(name, side, len(tokens) + 1, max_len)
        out.append((field, per_id if max_len > 1 else per_id[:, 0], tokens.to_pylist()))
    return out


def _dense(table: _Table | None, side: str, key: pa.ChunkedArray | None, vocab: pa.Array):
    """Each `side.dense.FIELD` column: (its name, [len(vocab) + 1] raw values per entity id, NaN where missing,
    and a function naming the table row of an entity id in a DatasetError). A value that is not a number within
    float32's range is a DatasetError naming the row; so is one beyond it once standardised (`_standardised`)."""
    if table is None:
        return []
    out = []
    for column, name in _fields(table, side, dense=True):
        values = table.strings(column, required=False)
        text = pc.utf8_trim_whitespace(values)
        number = pc.match_substring_regex(text, r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
        bad = pc.and_(pc.invert(pc.is_null(values)), pc.invert(pc.fill_null(number, False)))
        if pc.any(bad).as_py():
            row = _first(bad)
            raise DatasetError(table.file, column, row, f"{values[row].as_py()!r} is not a number (empty: missing)")
        raw = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        if (beyond := np.abs(raw) > FLOAT32_MAX).any():  # past float32's range (or float64's: infinite)
            row = int(np.flatnonzero(beyond)[0])
            raise DatasetError(
                table.file, column, row, f"{values[row].as_py()!r} is beyond float32's range (+-{FLOAT32_MAX:.3g})"
            )
        index = _index(key, vocab)
        per_id = np.full(len(vocab) + 1, np.nan)
        per_id[index] = raw

        def error(entity: int, problem: str, file=table.file, column=column, index=index) -> DatasetError:
            return DatasetError(file, column, int(np.flatnonzero(index == entity)[0]), problem)

        out.append((DenseField(name, side), per_id, error))
    return out


def _texts(table: _Table | None, key: pa.ChunkedArray | None, vocab: pa.Array, texts: list[str]) -> np.ndarray:
    """Appends the table's non-empty texts to `texts`; returns the text row of every id (-1: none)."""
    row_of = np.full(len(vocab) + 1, -1, np.int32)
    if table is None or not table.has("text"):
        return row_of
    values = table.strings("text", required=False).to_pylist()
    for entity, text in zip(_index(key, vocab), values):
        if text is not None:
            row_of[entity] = len(texts)
            texts.append(text.strip())
    return row_of


def _domains(table: _Table) -> list[Domain]:
    names = table.unique_ids("name").to_pylist()
    tasks = table.strings("task").to_pylist()
    pretrain = table.strings("pretrain", required=False)
    flags = pretrain.to_pylist() if pretrain is not None else [None] * len(names)
    domains = []
    for row, (name, task, flag) in enumerate(zip(names, tasks, flags)):
        if task not in TASKS:
            raise DatasetError(table.file, "task", row, f"task {task!r} is not one of {TASKS}")
        if flag is not None and flag.lower() not in ("true", "false", "1", "0"):
            raise DatasetError(table.file, "pretrain", row, f"{flag!r} is not true or false")
        domains.append(Domain(name, task, pretrain=flag is None or flag.lower() in ("true", "1")))
    return domains


def import_tables(
    src: str | Path,
    out: str | Path,
    name: str | None = None,
    overwrite: bool = False,
    negatives: int = 0,
    sampler: str = "uniform",
    seed: int = 0,
    key_prefix: str = "",
) -> Dataset:
    """Reads the tables in `src` (see the module docstring), writes the dataset to `out`, returns it.
    Impressions without a `label` column are implicit feedback (every row a click): `negatives` non-clicks
    per positive are sampled for them (`sr_jax.data.negatives`, `sampler` uniform or popularity, `seed`)."""
    src = Path(src)
    tables = {t: _read(src, t, required=t in ("domains", "impressions")) for t in TABLES}
    description = f"imported from {src.absolute()} by sr_jax.data.importer"
    imp = tables["impressions"]
    if not imp.has("label"):
        if negatives < 1:
            raise DatasetError(
                imp.file, "label", None, "missing column: label the rows, or sample negatives for implicit "
                "feedback (train.prepare tables --negatives N)"
            )  # fmt: skip
        tables["impressions"] = _Table(imp.file, _sample_negatives(imp, tables["items"], negatives, sampler, seed))
        description += f", {negatives} {sampler} negatives per positive (seed {seed})"
    elif negatives:
        raise DatasetError(imp.file, "label", None, "the impressions are labelled: --negatives is for unlabelled ones")
    return _write(tables, out, name or src.name, description, overwrite, key_prefix, negatives)


def _sample_negatives(imp: _Table, items: _Table | None, per_positive: int, sampler: str, seed: int) -> pa.Table:
    columns = {c: np.asarray(imp.strings(c, required=c in ("user_id", "item_id")).to_pylist(), dtype=object)
               for c in imp.table.column_names}  # fmt: skip
    queries = columns.get("query_id")
    pool = np.asarray(items.unique_ids("item_id").to_pylist(), dtype=object) if items else None
    drawn = negatives.sample(columns["user_id"], columns["item_id"], queries, per_positive, seed, sampler, pool=pool)
    return pa.table({k: list(v) for k, v in negatives.expand(columns, drawn).items()})


def keep_domains(tables: dict[str, pa.Table], keep: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> dict:
    """In-memory tables with the impressions of the `keep` domains (or all but `drop`), and the domains, items,
    users and queries those impressions use: a part of a dataset prepared apart from the rest, with
    vocabularies of its own."""
    names = tables["domains"]["name"].to_pylist()
    if unknown := sorted((set(keep) | set(drop)) - set(names)):
        raise ValueError(f"unknown domains {unknown}; the data has {names}")
    chosen = [n for n in names if (n in keep if keep else n not in drop)]
    out = dict(tables)
    out["domains"] = tables["domains"].filter(pc.is_in(tables["domains"]["name"], pa.array(chosen)))
    imp = tables["impressions"].filter(pc.is_in(tables["impressions"]["domain"], pa.array(chosen)))
    out["impressions"] = imp
    for table, key in (("items", "item_id"), ("users", "user_id"), ("queries", "query_id")):
        if table in tables and key in imp.column_names:
            used = pc.unique(pc.drop_null(pc.cast(imp[key], pa.string())))
            out[table] = tables[table].filter(pc.is_in(pc.cast(tables[table][key], pa.string()), used))
    return out


def from_arrow(
    tables: dict[str, pa.Table],
    out: str | Path,
    name: str,
    description: str,
    overwrite: bool = False,
    key_prefix: str = "",
    negatives_per_click: int | dict[str, int] = 0,
) -> Dataset:
    """The same, for tables a converter built in memory (`sr_jax.data.movielens`, ...); `negatives_per_click`:
    the non-clicks it sampled per click, for every domain (an int) or for some (domain -> count)."""
    wrapped = {t: _Table(Path(f"<{name} {t} table>"), tables[t]) if t in tables else None for t in TABLES}
    return _write(wrapped, out, name, description, overwrite, key_prefix, negatives_per_click)


def _write(
    tables: dict[str, _Table | None],
    out: str | Path,
    name: str,
    description: str,
    overwrite: bool,
    key_prefix: str,
    negatives_per_click: int | dict[str, int],
) -> Dataset:
    domain_table, imp = tables["domains"], tables["impressions"]
    for table in (domain_table, imp):
        if table.rows == 0:
            raise DatasetError(table.file, None, None, "no rows (only a header): nothing to import")
    domains = _domains(domain_table)
    if isinstance(negatives_per_click, int):
        negatives_per_click = {d.name: negatives_per_click for d in domains} if negatives_per_click else {}
    sampled = {d.name: negatives_per_click[d.name] for d in domains if d.name in negatives_per_click}
    if features := [c for c in imp.table.column_names if c.startswith(("user.", "item.", "query."))]:
        raise DatasetError(
            imp.file,
            features[0],
            None,
            "a feature column in impressions: features are per user or item, in the "
            "users and items tables (an impression carries split, domain, ids, label and timestamp only)",
        )
    keys = {
        "item": tables["items"].unique_ids("item_id") if tables["items"] else None,
        "user": tables["users"].unique_ids("user_id") if tables["users"] else None,
        "query": tables["queries"].unique_ids("query_id") if tables["queries"] else None,
    }
    ids = {
        "user": imp.strings("user_id"),
        "item": imp.strings("item_id"),
        "query": imp.strings("query_id", required=False),
    }
    vocab = {side: _vocab(keys[side], ids[side]) for side in ids}

    domain_names = pa.array([d.name for d in domains], pa.string())
    domain = pc.index_in(imp.strings("domain"), value_set=domain_names)
    if pc.any(pc.is_null(domain)).as_py():
        row = _first(pc.is_null(domain))
        value = imp.strings("domain")[row].as_py()
        raise DatasetError(imp.file, "domain", row, f"domain {value!r} is not declared in {domain_table.file}")
    label = imp.strings("label")
    bad = pc.invert(pc.is_in(label, value_set=pa.array(["0", "1"])))
    if pc.any(bad).as_py():
        row = _first(bad)
        raise DatasetError(imp.file, "label", row, f"label {label[row].as_py()!r} is not 0 or 1")
    timestamp = None
    if imp.has("timestamp"):
        values = imp.strings("timestamp")
        integer = pc.match_substring_regex(pc.utf8_trim_whitespace(values), r"^-?[0-9]{1,18}$")
        if not pc.all(integer).as_py():
            row = _first(pc.invert(integer))
            raise DatasetError(
                imp.file, "timestamp", row, f"{values[row].as_py()!r} is not an integer of at most 18 digits"
            )
        timestamp = pc.cast(pc.utf8_trim_whitespace(values), pa.int64()).to_numpy()

    texts: list[str] = []
    item_text = _texts(tables["items"], keys["item"], vocab["item"], texts)
    query_text = _texts(tables["queries"], keys["query"], vocab["query"], texts)
    sparse = _sparse(tables["users"], "user", keys["user"], vocab["user"]) + _sparse(
        tables["items"], "item", keys["item"], vocab["item"]
    )

    dense = _dense(tables["users"], "user", keys["user"], vocab["user"]) + _dense(
        tables["items"], "item", keys["item"], vocab["item"]
    )

    columns = {
        "domain": domain.to_numpy().astype(np.int32),
        "user_id": _index(ids["user"], vocab["user"]),
        "query_id": _index(ids["query"], vocab["query"]) if ids["query"] is not None else np.zeros(imp.rows, np.int32),
        "item_id": _index(ids["item"], vocab["item"]),
        "label": pc.cast(label, pa.int8()).to_numpy(),
    }
    columns["query_text"] = query_text[columns["query_id"]]
    columns["item_text"] = item_text[columns["item_id"]]
    for field, per_id, _ in sparse:
        columns[field.column] = per_id[columns[f"{field.side}_id"]]
    if timestamp is not None:
        columns["timestamp"] = timestamp

    split = np.asarray(imp.strings("split").to_numpy(zero_copy_only=False))
    dense_fields = []
    if dense and "train" not in split:
        problem = (
            f"{dense[0][0].column} is standardised with the train split's statistics, but no impression is in a "
            f"split named train (splits: {sorted(set(split))})"
        )
        raise DatasetError(imp.file, "split", None, problem)
    for field, per_id, error in dense:
        ids = columns[f"{field.side}_id"]
        field = field.fitted(per_id[ids][split == "train"])
        try:  # per entity, so that a value too far from the train split's names its row of the table
            columns[field.column] = field.standardise(per_id)[ids]
        except DenseOverflow as e:
            raise error(e.position, str(e)) from None
        dense_fields.append(field)
    splits = {s: {c: np.ascontiguousarray(a[split == s]) for c, a in columns.items()} for s in sorted(set(split))}
    meta = DatasetMeta(
        name=name,
        domains=domains,
        vocab={f"{side}_id": len(vocab[side]) + 1 for side in ("user", "query", "item")},
        sparse_fields=[field for field, _, _ in sparse],
        dense_fields=dense_fields,
        splits={},
        num_texts=0,
        has_timestamp=timestamp is not None,
        description=description,
        negatives_per_click=sampled,
    )
    # `key_prefix` (train.prepare --key-prefix) keeps a catalogue's user, query and item keys apart from another
    # dataset's: two catalogues that both number their users 1, 2, ... would otherwise share those users' rows
    keys = {f"{side}_id": [key_prefix + k for k in vocab[side].to_pylist()] for side in ("user", "query", "item")}
    keys.update({field.column: tokens for field, _, tokens in sparse})
    return write_dataset(out, meta, texts, splits, keys, overwrite=overwrite)
