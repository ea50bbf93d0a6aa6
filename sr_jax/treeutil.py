"""Naming leaves of pytrees the same way everywhere (params, optimizer state, checkpoint metadata)."""

from __future__ import annotations

from typing import Any

import jax


def key_name(key) -> str:
    """'l0' for DictKey('l0'), '1' for SequenceKey(1), 'count' for GetAttrKey('count')."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(path: tuple) -> tuple[str, ...]:
    return tuple(key_name(k) for k in path)


def path_str(path: tuple) -> str:
    return "/".join(path_names(path))


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'path/to/leaf' -> shape, for arrays, ShapeDtypeStructs and orbax metadata alike."""
    return {path_str(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def mismatches(saved: Any, target: Any, free_first_axis: frozenset[str] = frozenset()) -> list[str]:
    """Every difference between a saved tree and the tree it should restore into, one sentence each naming
    the parameter path and both shapes (parameters before optimizer state); empty if they match. Leaves in
    `free_first_axis` (paths) may differ in their first dimension."""
    have, want = shapes(saved), shapes(target)

    def order(paths):
        return sorted(paths, key=lambda p: (p.startswith("opt_state/"), p))

    problems = [
        f"parameter {p} (shape {want[p]}) is missing from the checkpoint" for p in order(want.keys() - have.keys())
    ]
    problems += [
        f"checkpoint has parameter {p} (shape {have[p]}) that the model lacks" for p in order(have.keys() - want.keys())
    ]
    for path in order(want.keys() & have.keys()):
        same = have[path][1:] == want[path][1:] if path in free_first_axis else have[path] == want[path]
        if not same:
            problems.append(f"parameter {path} has shape {have[path]} in the checkpoint, {want[path]} in the model")
    return problems


def flatten(tree: Any) -> dict[str, Any]:
    """A nested dict's leaves by 'path/to/leaf' name (what files that hold a flat name -> array map use)."""
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """`flatten`'s inverse: {'l0/id_tables/user': x} -> {'l0': {'id_tables': {'user': x}}}; a name of digits
    is a list index (an int key, as `nnx.to_pure_dict` writes a layer list's)."""
    out: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = out
        for key in parents:
            node = node.setdefault(int(key) if key.isdigit() else key, {})
        node[int(last) if last.isdigit() else last] = leaf
    return out
