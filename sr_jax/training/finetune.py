"""Fine-tuning from a pretrained run: which domains are new, and the pretrained parameters in the
fine-tune model's shapes.

Every run writes `run_info.json` beside its checkpoints: the domains its per-domain parameter rows stand
for (in row order), the ones it actually trained, and the text encoder its text projection was fitted
to. A fine-tune run maps its dataset's domains onto those rows by name. A domain the pretrained run
never trained (held out of pretraining, or absent from its dataset) is *new*: its domain-embedding
row, adapter W_k, expert gate and tower start from a fresh init and stay trainable when their level
is frozen. Every other parameter is restored exactly; a structure or shape difference is a
`CheckpointError` naming the parameter path and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sr_jax.data.store import Dataset
from sr_jax.training.checkpoint import CheckpointError, ParamsReader, check_compatible
from sr_jax.treeutil import path_str, shapes

RUN_INFO = "run_info.json"


def write_run_info(
    workdir: Path, dataset: Dataset, train_domains: np.ndarray, text: tuple[str, str], pretrained: dict | None
) -> dict:
    """Records what the run's parameters mean. `train_domains`: the domain column of the train data."""
    names = [d.name for d in dataset.meta.domains]
    trained = {names[k] for k in np.unique(train_domains)}
    if pretrained is not None:
        trained |= set(pretrained["trained_domains"]) & set(names)
    info = {
        "dataset": dataset.meta.name,
        "domains": names,
        "trained_domains": [n for n in names if n in trained],
        "text_encoder": text[0],
        "text_fingerprint": text[1],
        "pretrained": pretrained,  # so that this run resumes and evaluates without the pretrained folder
    }
    (workdir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise CheckpointError(f"{path}: missing; is {run_dir} a run folder of train.pretrain or train.finetune?")
    return json.loads(path.read_text())


def pretrained_info(workdir: Path, pretrained_dir: str | Path) -> dict:
    """The pretrained run's run_info: as this run recorded it when it started, else from the pretrained
    folder (which is then needed only until the first checkpoint)."""
    own = workdir / RUN_INFO
    if own.exists() and (recorded := json.loads(own.read_text()).get("pretrained")) is not None:
        return recorded
    return read_run_info(pretrained_dir)


@dataclasses.dataclass(frozen=True)
class DomainMap:
    """source[k]: the pretrained row of fine-tune domain k, or None for a new domain."""

    source: tuple[int | None, ...]

    @property
    def new_rows(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.source) if s is None)


def domain_map(dataset: Dataset, pretrained: dict) -> DomainMap:
    rows = {name: k for k, name in enumerate(pretrained["domains"])}
    trained = set(pretrained["trained_domains"])
    return DomainMap(tuple(rows[d.name] if d.name in trained else None for d in dataset.meta.domains))


def check_text_encoder(pretrained: dict, text: tuple[str, str], run_dir: str | Path) -> None:
    """The text projection was fitted to one encoder's features: fine-tuning on another's is an error."""
    if (pretrained["text_encoder"], pretrained["text_fingerprint"]) != tuple(text):
        raise CheckpointError(
            f"{Path(run_dir) / RUN_INFO}: pretrained with text encoder {pretrained['text_encoder']!r} "
            f"({pretrained['text_fingerprint']}), but this run uses {text[0]!r} ({text[1]})"
        )


def restore_pretrained(run_dir: str | Path, step: int, abstract_params: Any, per_domain: Any, n_pretrained: int) -> Any:
    """The pretrained parameters as saved: per-domain leaves keep the pretrained run's rows; every other
    leaf takes the shape and sharding of `abstract_params` (an error when they differ)."""
    reader = ParamsReader(Path(run_dir) / "checkpoints")
    try:
        step = reader.step(step)
        saved = reader.metadata(step)
        domain_paths = frozenset(
            "params/" + path_str(p) for p, is_domain in jax.tree_util.tree_leaves_with_path(per_domain) if is_domain
        )
        check_compatible(
            reader.directory / str(step) / "state", {"params": saved}, {"params": abstract_params}, domain_paths
        )

        saved_shapes = shapes(saved)  # by path: orbax metadata spells list indices as strings

        def target(path, want, is_domain):
            rows = saved_shapes[path_str(path)][0] if is_domain else None
            if rows is None:
                return want
            if rows != n_pretrained:
                raise CheckpointError(
                    f"{reader.directory / str(step)}: parameter params/{path_str(path)} has {rows} domain rows, "
                    f"but {RUN_INFO} lists {n_pretrained} domains"
                )
            return jax.ShapeDtypeStruct((rows, *want.shape[1:]), want.dtype, sharding=want.sharding)

        targets = jax.tree_util.tree_map_with_path(target, abstract_params, per_domain)
        return reader.restore(step, targets)
    finally:
        reader.close()


def merge_pretrained(pretrained: Any, fresh: Any, per_domain: Any, mapping: DomainMap) -> Any:
    """Pretrained leaves, except per-domain leaves: their mapped rows come from the pretrained run, the
    new domains' rows from `fresh` (jit-able; XLA drops the unused parts of `fresh`)."""
    dst = np.array([k for k, s in enumerate(mapping.source) if s is not None], np.int32)
    src = np.array([s for s in mapping.source if s is not None], np.int32)

    def merge(pre, new, is_domain):
        return new.at[dst].set(pre[src]) if is_domain else pre

    return jax.tree.map(merge, pretrained, fresh, per_domain)
