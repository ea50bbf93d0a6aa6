"""Item and query vectors for retrieval: `python -m train.embed --workdir RUN --out DIR [--data DIR] [--split test]`.

Writes DIR/items.parquet (per domain: each item's fused vector, id row and text features), DIR/queries.parquet
(each user and query of the split: the fused user and query vectors and the retrieval vector), embeddings.json
(what they mean) and retrieval.json (recall@k of dot-product retrieval against the model's own top k).
"""

from __future__ import annotations

import argparse
import json

from sr_jax import io
from sr_jax.data.store import open_dataset
from sr_jax.export import embeddings, trained
from train import cli


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="the run folder (its result's parameters)")
    p.add_argument("--out", required=True, help="the output folder (embeddings there are replaced)")
    cli.add_overwrite(p)
    p.add_argument("--data", default=None, help="a prepared dataset folder (default: the run's own dataset)")
    p.add_argument("--split", default="test", help="the split whose users and queries are embedded")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--recall-k", type=int, default=10)
    p.add_argument("--recall-queries", type=int, default=200, help="queries per domain that recall@k averages over")
    args = p.parse_args(argv)
    cli.setup()
    io.claim(args.out, io.EMBEDDINGS, args.overwrite, inputs=(args.workdir, *filter(None, [args.data])))
    model = trained.load(args.workdir)
    dataset = open_dataset(args.data) if args.data else model.dataset()
    info = embeddings.embed(
        model, dataset, args.split, args.out, args.batch_size, args.recall_k, args.recall_queries, args.overwrite
    )
    print(json.dumps(info["retrieval"], indent=2))
    return info


if __name__ == "__main__":
    cli.interruptible(main)
