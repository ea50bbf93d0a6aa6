"""Text-encoder throughput: `python -m train.bench_text [--num-texts N] [--dtype bfloat16] [--out FILE]`.

1. End to end: N real texts (Amazon Scientific item texts and MovieLens titles from `--data`, repeated to
   N; synthetic texts where that folder is absent) written as a dataset's text table, then
   `build_text_cache`: tokenize, length-bucketed encode, write. Reported in texts/s.
2. The model alone at fixed lengths (random token ids, no padding), median of repeated jitted calls.
3. Where torch is importable, in the same run: transformers' BertModel on the same weights at the same
   lengths (bf16 on a GPU when --dtype is bfloat16), and sentence-transformers' encode() end to end where
   that is importable too.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.data.schema import DatasetMeta, Domain, numbered_keys
from sr_jax.data.store import write_dataset
from sr_jax.text import build_text_cache, load_encoder
from train import cli


def real_texts(data: Path) -> list[str]:
    texts = []
    amazon = data / "amazon-scientific" / "Scientific.text"
    if amazon.exists():
        with open(amazon, encoding="utf-8") as f:
            texts += [line.rstrip("\n").split("\t", 1)[1] for line in list(f)[1:]]
    movies = data / "movielens-latest-small" / "movies.csv"
    if movies.exists():
        with open(movies, encoding="utf-8") as f:
            texts += [f"{m['title']}. {m['genres'].replace('|', ', ')}" for m in csv.DictReader(f)]
    if not texts:
        from sr_jax.config import SyntheticConfig
        from sr_jax.data import synthetic

        texts = synthetic.ensure(SyntheticConfig()).texts()
    return [t for t in texts if t.strip()]


def text_dataset(texts: list[str], root: Path) -> Path:
    """A one-example dataset whose text table is `texts` (what build_text_cache works on)."""
    one = {"domain": [0], "user_id": [1], "query_id": [0], "item_id": [1], "query_text": [-1], "item_text": [0]}
    split = {k: np.asarray(v, np.int32) for k, v in one.items()} | {"label": np.ones(1, np.int8)}
    meta = DatasetMeta("bench", [Domain("d", "rec")], {"user_id": 2, "query_id": 1, "item_id": 2}, [], {}, 0)
    write_dataset(root, meta, texts, {"train": split}, numbered_keys(meta))
    return root


def median_time(repeats: int, fn, *args) -> float:
    """Median seconds of fn(*args) over `repeats` calls, after two warm-up calls (compile, first transfers)."""
    fn(*args)
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_rows(folder: Path, texts: list[str], lengths: list[int], batch: int, dtype: str, repeats: int) -> list:
    try:
        import torch
        from transformers import BertModel
    except ImportError:
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == "bfloat16" and device == "cuda" else torch.float32
    model = BertModel.from_pretrained(str(folder), torch_dtype=tdtype).to(device).eval()
    rows = []
    for length in lengths:
        ids = torch.randint(1000, 20000, (batch, length), device=device)

        def run(ids):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().item()

        rows.append(
            {
                "path": f"torch BertModel {str(tdtype).split('.')[-1]} {device}, model only",
                "length": length,
                "texts_per_s": batch / median_time(repeats, run, ids),
            }
        )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return rows
    st = SentenceTransformer(str(folder), device=device)
    if tdtype == torch.bfloat16:
        st = st.to(torch.bfloat16)
    start = time.perf_counter()
    st.encode(texts, batch_size=512)
    rows.append(
        {
            "path": "sentence-transformers encode(), end to end",
            "length": "texts",
            "texts_per_s": len(texts) / (time.perf_counter() - start),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--num-texts", type=int, default=100_000)
    p.add_argument("--data", default="../shared/data", help="where the real texts come from")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lengths", default="32,64")
    p.add_argument("--dtype", default="bfloat16" if jax.default_backend() == "gpu" else "float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    pool = real_texts(Path(args.data))
    texts = [pool[i % len(pool)] for i in range(args.num_texts)]
    encoder = load_encoder(args.encoder, batch_size=args.batch_size, dtype=args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = text_dataset(texts, Path(tmp) / "ds")
        start = time.perf_counter()
        build_text_cache(root, encoder, chunk_size=max(8192, args.batch_size * 8))
        rows.append(
            {
                "path": f"sr-jax build_text_cache {args.dtype}, end to end",
                "length": "texts",
                "texts_per_s": len(texts) / (time.perf_counter() - start),
            }
        )
    for length in lengths:
        ids = jnp.asarray(np.random.default_rng(0).integers(1000, 20000, (args.batch_size, length)), jnp.int32)
        mask = jnp.ones_like(ids)
        seconds = median_time(args.repeats, lambda i, m: jax.block_until_ready(encoder.forward(i, m)), ids, mask)
        rows.append(
            {
                "path": f"sr-jax Flax encoder {args.dtype}, model only",
                "length": length,
                "texts_per_s": args.batch_size / seconds,
            }
        )
    rows += torch_rows(encoder.spec.folder, texts, lengths, args.batch_size, args.dtype, args.repeats)
    device = jax.devices()[0].device_kind
    print(f"\n{args.num_texts} texts, batch {args.batch_size}, {device} ({jax.default_backend()})\n")
    print("| path | length | texts/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['length']} | {r['texts_per_s']:,.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    cli.interruptible(main)
