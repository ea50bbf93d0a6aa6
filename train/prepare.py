"""Convert a dataset into the store once: `python -m train.prepare NAME --src DIR --out DIR [--encoder NAME]`.

`tables`: your own CSV / Parquet tables (format: sr_jax/data/importer.py and the README); `movielens`:
MovieLens ml-latest-small (sr_jax/data/movielens.py); `amazon`: Amazon Industrial & Scientific
(sr_jax/data/amazon.py). The text cache
of `--encoder` (default: the default config's, all-MiniLM-L6-v2; `none` to skip) is built right after,
so `python -m train.pretrain --workdir RUN data.path=OUT` can train on it.
"""

from __future__ import annotations

import argparse

from sr_jax.config import Config
from sr_jax.data import amazon, movielens
from sr_jax.data.importer import import_tables
from sr_jax.data.store import open_dataset
from sr_jax.text import build_text_cache, get_featurizer
from train import cli

CONVERTERS = {"tables": import_tables, "movielens": movielens.convert, "amazon": amazon.convert}


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(CONVERTERS))
    p.add_argument("--src", required=True, help="the source folder")
    p.add_argument("--out", required=True, help="the dataset folder to write")
    p.add_argument("--encoder", default=Config().data.text_encoder, help="text encoder of the cache, or none")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    args = p.parse_args(argv)
    cli.setup()
    dataset = CONVERTERS[args.name](args.src, args.out, overwrite=args.overwrite)
    if args.encoder != "none":
        build_text_cache(dataset.root, get_featurizer(args.encoder))
        dataset = open_dataset(dataset.root)
    print(
        f"{dataset.root}: {dataset.meta.splits}, {dataset.meta.num_texts} texts, domains "
        f"{[d.name for d in dataset.meta.domains]}"
    )
    return dataset


if __name__ == "__main__":
    main()
