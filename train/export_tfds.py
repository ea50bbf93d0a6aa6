"""Export a store dataset as tensorflow-datasets array_record files:
`python -m train.export_tfds --data DIR --out TFDS_DIR`, then `tfds.data_source("sr_jax_store", data_dir=TFDS_DIR)`.
"""

from __future__ import annotations

import argparse

from sr_jax.data.tfds_store import write_tfds
from train import cli


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a dataset folder of the store")
    p.add_argument("--out", required=True, help="the tfds data_dir to write")
    args = p.parse_args(argv)
    out = write_tfds(args.data, args.out)
    print(f"wrote {out}; read it with tfds.data_source('sr_jax_store', data_dir={args.out!r})")
    return out


if __name__ == "__main__":
    cli.interruptible(main)
