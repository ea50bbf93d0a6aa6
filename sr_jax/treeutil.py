"""Naming leaves of pytrees the same way everywhere (params, optimizer state, checkpoint metadata)."""

from __future__ import annotations


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
