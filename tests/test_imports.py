"""The library's import graph points one way: sr_jax never imports the entry points (train) or the named
configs (configs), and neither two of its modules nor two of its packages (data, text, model, training, ...)
import each other, even from inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    graph = {}
    for file in (ROOT / "sr_jax").rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(file.read_text())):  # every import, top level or in a function
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = names
    return graph


def test_the_library_never_imports_train_or_configs():
    offenders = {
        m: sorted(n for n in names if n.split(".")[0] in ("train", "configs")) for m, names in _imports().items()
    }
    assert not {m: n for m, n in offenders.items() if n}


def _package(module: str) -> str:
    """sr_jax.data.store -> sr_jax.data; top-level modules (sr_jax.config) stand for themselves."""
    return ".".join(module.split(".")[:2])


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level):
    graph = _imports()
    name = (lambda m: m) if level == "module" else _package
    edges: dict[str, set[str]] = {}
    for m, names in graph.items():
        targets = {name(n) for n in names if n in graph and not m.startswith(n + ".") and n != "sr_jax"}
        edges.setdefault(name(m), set()).update(targets - {name(m)})
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in edges[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_named_configs_are_leaf_data():
    """configs/ builds on the config system only (sr_jax.config, sr_jax.protocols), never on the library's
    training, experiment or model modules: a named config is data."""
    allowed = ("sr_jax.config", "sr_jax.protocols", "configs", "__future__", "dataclasses", "json", "pathlib")
    offenders = {}
    for file in (ROOT / "configs").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if bad := [n for n in names if not n.startswith(allowed)]:
                offenders[file.name] = bad
    assert not offenders


def test_every_test_the_reliability_doc_names_exists():
    """docs/RELIABILITY.md promises each case with a test: a renamed or removed test makes it promise nothing."""
    import re

    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    named, missing = 0, []
    for line in doc.splitlines():
        file = None
        for m in re.finditer(r"`(?:(test_\w+\.py))?::(\w+)`", line):
            file = m.group(1) or file
            named += 1
            if f"def {m.group(2)}(" not in (ROOT / "tests" / file).read_text():
                missing.append(f"{file}::{m.group(2)}")
    assert named > 40 and not missing
