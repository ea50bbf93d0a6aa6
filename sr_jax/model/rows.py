"""Where an embedding table stores its rows: strided, so that every range of rows spreads over every shard.

A table split over the model axis gives each of its M shards one contiguous block of R / M stored rows. Stored in
row order, a range of rows sits on one shard: a fine-tune appends every new key after the pretrained rows (its
batches are mostly new ids), and a vocabulary ordered by popularity puts its head first, so one shard would own
most of a batch's ids and the routed lookup (`lookup.routed_lookup`) would drop what exceeds its capacity.
`model.row_layout=strided` (the default) stores row r of a table of R rows (a multiple of m =
`model.table_row_multiple`) at

    position(r) = (r mod m) x (R / m) + (r div m)

so a shard (M dividing m) holds the rows of m / M consecutive residues mod m: any m consecutive rows spread
evenly over every shard, whatever R and whatever the mesh. `contiguous` stores row r at r (runs saved before
the option read it so). Only `encoding.FeatureEncoder.table_rows` reads tables by position; code that reads a
table by row outside the model (fine-tune merges, exports, the torch conversion) converts with `row_order` and
`stored`.
"""

from __future__ import annotations

from typing import Any

from sr_jax.config import ModelConfig


def layout(cfg: ModelConfig) -> tuple[int, str]:
    """(row multiple, layout): what `position`, `row_order` and `stored` take after their array."""
    return cfg.table_row_multiple, cfg.row_layout


def position(rows: Any, table_rows: int, multiple: int, layout: str) -> Any:
    """Rows (int array, numpy or jax) of a table of `table_rows` rows -> where the table stores them."""
    if layout == "contiguous":
        return rows
    return (rows % multiple) * (table_rows // multiple) + rows // multiple


def row_order(table: Any, multiple: int, layout: str) -> Any:
    """A stored table (or any array with one entry per stored row on its first axis) -> the same in row order."""
    if layout == "contiguous":
        return table
    r = table.shape[0]
    return table.reshape(multiple, r // multiple, *table.shape[1:]).swapaxes(0, 1).reshape(table.shape)


def stored(table: Any, multiple: int, layout: str) -> Any:
    """An array in row order (one entry per row on its first axis) -> as the table stores it (`row_order`'s
    inverse)."""
    if layout == "contiguous":
        return table
    r = table.shape[0]
    return table.reshape(r // multiple, multiple, *table.shape[1:]).swapaxes(0, 1).reshape(table.shape)
