"""Convert a dataset into the store once: `python -m train.prepare NAME --src DIR --out DIR [--encoder NAME]
[--reuse-text DATASET ...] [converter options]`.

`tables`: your own CSV / Parquet tables (format: sr_jax/data/importer.py and docs/DATA.md; `--negatives N`
samples non-clicks for unlabelled impressions); `movielens`: MovieLens ml-latest-small
(sr_jax/data/movielens.py; `--domains` / `--exclude-domains` prepare a genre group apart); `amazon`: an
Amazon category in RecBole's atomic files (sr_jax/data/amazon.py; `--categories` /
`--exclude-categories` prepare a sub-category tree apart). The text cache of `--encoder` (default: the
default config's, all-MiniLM-L6-v2; `none` to skip) is built right after, copying every text that a
`--reuse-text` dataset (or the dataset `--overwrite` replaces) already encoded, so that
`python -m train.pretrain --workdir RUN data.path=OUT` can train on it. A killed run of the command
resumes when run again (the dataset is kept, the cache build continues from its last finished chunk); a
different command on an existing dataset is refused unless `--overwrite`, and so is a folder that is not a
dataset (a user's files, a training run): nothing is replaced that this command did not write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from sr_jax import io
from sr_jax.config import Config
from sr_jax.data import amazon, movielens, negatives
from sr_jax.data.importer import import_tables
from sr_jax.data.store import open_dataset
from sr_jax.text import build_text_cache, get_featurizer, text_identity
from train import cli

PREPARED = "prepared.json"  # the command that made a dataset folder: a rerun of it resumes, another is refused
CONVERTERS = {"tables": import_tables, "movielens": movielens.convert, "amazon": amazon.convert}


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(CONVERTERS))
    p.add_argument("--src", required=True, help="the source folder")
    p.add_argument("--out", required=True, help="the dataset folder to write")
    p.add_argument("--encoder", default=Config().data.text_encoder, help="text encoder of the cache, or none")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what OUT holds: another command's dataset, or files this "
        "command did not write (never the source)",
    )
    p.add_argument("--reuse-text", nargs="+", default=[], metavar="DATASET", help="datasets whose cached texts to copy")
    p.add_argument("--seed", type=int, default=0, help="the negative sampler's seed")
    p.add_argument(
        "--key-prefix",
        default="",
        help="prefix every user, query and item key: a catalogue whose ids must never "
        "meet another dataset's (both numbering users 1, 2, ...) when a run of one is fine-tuned on the other",
    )
    p.add_argument("--negatives", type=int, default=0, help="tables: non-clicks sampled per unlabelled impression")
    p.add_argument("--sampler", default="uniform", choices=negatives.SAMPLERS, help="tables: how negatives are drawn")
    p.add_argument("--domains", nargs="+", default=[], help="movielens: keep only these domains")
    p.add_argument("--exclude-domains", nargs="+", default=[], help="movielens: leave out these domains")
    p.add_argument("--categories", nargs="+", default=[], help="amazon: keep these top-level categories")
    p.add_argument("--exclude-categories", nargs="+", default=[], help="amazon: leave out these categories")
    p.add_argument("--users", default="", metavar="K/N", help="amazon: keep the users whose index is K modulo N")
    p.add_argument("--root", help="amazon: the category path's root in the item texts (known for RecBole's names)")
    args = p.parse_args(argv)
    cli.setup()
    options = {
        "tables": dict(negatives=args.negatives, sampler=args.sampler, seed=args.seed),
        "movielens": dict(domains=tuple(args.domains), exclude_domains=tuple(args.exclude_domains), seed=args.seed),
        "amazon": dict(categories=tuple(args.categories), exclude_categories=tuple(args.exclude_categories),
                       root=args.root, seed=args.seed, users=args.users),
    }[args.name]  # fmt: skip
    if args.key_prefix:
        options["key_prefix"] = args.key_prefix
    out, reuse = Path(args.out), list(args.reuse_text)
    # a folder that is not a dataset (a user's files, a run) is never replaced without --overwrite, and no input
    # ever: the source and the datasets whose texts are reused
    io.claim(out, io.DATASET, args.overwrite, inputs=(args.src, *reuse))
    previous = out.with_name(f".{out.name}.previous")
    made_by = {"converter": args.name, "src": str(Path(args.src).absolute()), **options}
    if (out / "meta.json").exists() and not args.overwrite:
        # a rerun of the same command finishes what a killed one left (the text cache is resumable)
        if _read_json(out / PREPARED) != json.loads(json.dumps(made_by)):
            raise FileExistsError(
                f"{out} exists and was not prepared by this command (its {PREPARED} differs): pass --overwrite to "
                "replace it, or choose another --out"
            )
        dataset = open_dataset(out, check=False)
    else:
        if args.overwrite and (out / "meta.json").exists() and args.encoder != "none":
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out, previous)  # kept until the new cache is built: its texts are not encoded again
            reuse.append(str(previous))
        # The dataset is written under a staging name and gets its record before its final name: a kill
        # anywhere leaves either no `out` (the rerun starts over, replacing the staging folder) or a complete
        # one that says which command made it (the rerun resumes).
        staging = out.with_name(f".{out.name}.preparing")
        CONVERTERS[args.name](args.src, staging, overwrite=True, **options)
        (staging / PREPARED).write_text(json.dumps(made_by, indent=2) + "\n")
        if out.exists():  # an empty folder, or --overwrite of what is not kept as `previous`
            io.claim(out, io.DATASET, args.overwrite, inputs=(args.src, *reuse))
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(staging, out)
        dataset = open_dataset(out, check=False)
    if args.encoder != "none" and text_identity(args.encoder) not in _caches(dataset):
        build_text_cache(dataset.root, get_featurizer(args.encoder), reuse=reuse)
        dataset = open_dataset(dataset.root)
    shutil.rmtree(previous, ignore_errors=True)
    print(
        f"{dataset.root}: {dataset.meta.splits}, {dataset.meta.num_texts} texts, domains "
        f"{[d.name for d in dataset.meta.domains]}"
    )
    return dataset


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _caches(dataset) -> set[tuple[str, str]]:
    return {(name, c.fingerprint) for name, c in dataset.meta.text_caches.items()}


if __name__ == "__main__":
    cli.interruptible(main)
