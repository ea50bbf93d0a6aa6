"""Levels L0, L1, L2 (docs/DESIGN.md): the first key of every parameter path names its level."""

from __future__ import annotations

from typing import Any

import jax

from sr_jax.config import LEVELS
from sr_jax.treeutil import key_name, path_str


def level_of(path: tuple) -> str:
    """The level of a parameter, from its key path in the params tree."""
    name = key_name(path[0])
    if name not in LEVELS:
        raise ValueError(f"parameter path {path_str(path)} does not start with a level {LEVELS}")
    return name


def leaf_levels(params: Any) -> Any:
    """A tree like `params` whose leaves are the level names (for optax.multi_transform and reports)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: level_of(path), params)
