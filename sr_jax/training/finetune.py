"""Fine-tuning from a pretrained run: the cold-start protocols and their schedule, which domains are new,
what a run records for the runs started from it, and the pretrained parameters in the fine-tune
model's shapes.

Every run writes, beside its checkpoints:
- `run_info.json`: the domains its per-domain parameter rows stand for (in row order), the ones it
  actually trained, the split it trained on, and the text encoder its text projection was fitted to;
- `trained_items.npy`: which item ids its id rows were trained on (its own data and its pretrained run's);
- `reference.npz` (`sr_jax.training.alignment`): a sample of each trained domain's z, what fine-tuning
  aligns against.
A fine-tune run copies these from its pretrained run into its own `pretrained/` folder when it starts,
so it resumes and evaluates without the pretrained folder. It maps its dataset's domains onto the
pretrained rows by name. A domain the pretrained run never trained (held out of pretraining, or absent
from its dataset) is *new*: its domain-embedding row, adapter W_k, expert gate and tower start from a
fresh init and stay trainable when their level is frozen. Every other parameter is restored exactly; a
structure or shape difference is a `CheckpointError` naming the parameter path and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sr_jax.config import Config, FinetuneConfig, TrainConfig
from sr_jax.data.store import Dataset
from sr_jax.io import atomic_dir
from sr_jax.training.checkpoint import CheckpointError, ParamsReader, check_compatible
from sr_jax.treeutil import path_str, shapes

RUN_INFO = "run_info.json"
TRAINED_ITEMS = "trained_items.npy"
SNAPSHOT = "pretrained"  # a fine-tune run's copy of what it needs from its pretrained run

# protocol -> (train split, eval split) of the embedded dataset (docs/DESIGN.md, "Cold start")
PROTOCOLS = {
    "new-domain": ("heldout_train", "heldout_test"),  # a domain held out of pretraining
    "cold-items": ("cold_train", "cold_test"),  # new items in the known domains
}


def finetune_config(pretrained: Config, protocol: str = "new-domain") -> Config:
    """A fine-tune run of `protocol` from a pretrained run's config: its model and data (so the architecture
    and the text features match), the protocol's splits, and fine-tuning's own schedule, with levels L0
    and L1 frozen (the paper's best split)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown cold-start protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    train_split, eval_split = PROTOCOLS[protocol]
    data = dataclasses.replace(
        pretrained.data, train_split=train_split, eval_split=eval_split, batch_size=256, pretrain_domains_only=False
    )
    return dataclasses.replace(
        pretrained,
        data=data,
        train=TrainConfig(
            seed=pretrained.train.seed,
            epochs=5.0,
            min_steps=100,
            learning_rate=2e-3,
            warmup_steps=20,
            log_every=20,
            checkpoint_every=100,
        ),
        finetune=FinetuneConfig(freeze=("l0", "l1")),
    )


def write_run_info(
    workdir: Path,
    dataset: Dataset,
    train_split: str,
    train_domains: np.ndarray,
    text: tuple[str, str],
    pretrained: dict | None,
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
        "train_split": train_split,
        "text_encoder": text[0],
        "text_fingerprint": text[1],
        "pretrained": pretrained,  # the pretrained run's record, for provenance
    }
    (workdir / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_run_info(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_INFO
    if not path.exists():
        raise CheckpointError(f"{path}: missing; is {run_dir} a run folder of train.pretrain or train.finetune?")
    return json.loads(path.read_text())


def pretrained_folder(workdir: Path, pretrained_dir: str | Path) -> Path:
    """Where this run reads its pretrained run's records: its own snapshot once it has one, else the
    pretrained folder itself."""
    own = workdir / SNAPSHOT
    return own if (own / RUN_INFO).exists() else Path(pretrained_dir)


def snapshot_pretrained(workdir: Path, pretrained_dir: str | Path) -> None:
    """Copies the pretrained run's records (run_info, trained items, alignment reference) into
    `workdir/pretrained/`, once, so the fine-tune run no longer needs the pretrained folder."""
    if (workdir / SNAPSHOT / RUN_INFO).exists():
        return
    src = Path(pretrained_dir)
    with atomic_dir(workdir / SNAPSHOT) as tmp:
        for name in (RUN_INFO, TRAINED_ITEMS, "reference.npz"):
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)


def write_trained_items(workdir: Path, items: np.ndarray) -> None:
    np.save(workdir / TRAINED_ITEMS, np.asarray(items, bool))


def read_trained_items(run_dir: Path, vocab: int) -> np.ndarray:
    """[vocab] bool: the item ids a run's id rows were trained on."""
    path = Path(run_dir) / TRAINED_ITEMS
    if not path.exists():
        raise CheckpointError(f"{path}: missing (written by every run since the cold-item fix; re-run it)")
    items = np.load(path)
    if items.shape != (vocab,):
        raise CheckpointError(f"{path}: {items.shape[0]} items, but this dataset has {vocab}")
    return items


@dataclasses.dataclass(frozen=True)
class DomainMap:
    """source[k]: the pretrained row of fine-tune domain k, or None for a new domain."""

    source: tuple[int | None, ...]

    @property
    def new_domains(self) -> tuple[int, ...]:
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
