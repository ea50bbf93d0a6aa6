"""Fill a dataset's text-embedding cache: `python -m train.encode_text --data DIR --encoder PATH_OR_NAME`.

The encoder is `hashed-bow`, a packaged encoder name (`all-MiniLM-L6-v2`) or a BERT-family checkpoint folder.
Resumable: run the same command again after an interruption and finished chunks are kept.
"""

from __future__ import annotations

import argparse
import time

from sr_jax.data.store import open_dataset
from sr_jax.text import build_text_cache, get_featurizer
from train import cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--encoder", required=True)
    p.add_argument("--chunk-size", type=int, default=8192, help="texts per saved chunk (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per encoder call (larger on accelerators)")
    p.add_argument("--dtype", default="float32", help="encoder compute dtype: float32, or bfloat16 on accelerators")
    args = p.parse_args(argv)
    cli.setup()
    featurizer = get_featurizer(args.encoder, batch_size=args.batch_size, dtype=args.dtype)
    start = time.perf_counter()
    build_text_cache(args.data, featurizer, chunk_size=args.chunk_size)
    n = open_dataset(args.data).meta.num_texts
    elapsed = time.perf_counter() - start
    print(f"{n} texts encoded by {featurizer.fingerprint()} in {elapsed:.1f} s ({n / elapsed:,.0f} texts/s)")


if __name__ == "__main__":
    cli.interruptible(main)
