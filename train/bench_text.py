"""Text-encoder throughput: `python -m train.bench_text [--encoder SPEC | --random FAMILY] [--num-texts N]
[--dtype bfloat16] [--out FILE]`.

1. End to end: N real texts (Amazon Scientific item texts and MovieLens titles from `--data`, repeated to
   N; synthetic texts where that folder is absent) written as a dataset's text table, then
   `build_text_cache`: tokenize, length-bucketed encode, write. Reported in texts/s and tokens/s.
2. The model alone at fixed lengths (random token ids, no padding), median of repeated jitted calls.
3. Where torch is importable, in the same run: transformers' PyTorch model on the same weights at the same
   lengths (SDPA attention; bf16 on a GPU when --dtype is bfloat16), and sentence-transformers' encode()
   end to end where that is importable too (BERT-family encoders).

`--random FAMILY --layers L --width W` benchmarks a decoder language model of that family with random
weights (no weights can be downloaded), made by transformers (so it needs torch) with MiniLM's tokenizer.
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


def random_decoder(family: str, layers: int, width: int, intermediate: int, root: Path) -> Path:
    """A decoder checkpoint folder with random weights (transformers' init), `width` wide: heads of 64, key and
    value heads the largest divisor of the heads up to a quarter of them (GQA), an MLP `intermediate` wide
    (0: 8/3 x width, rounded up to 64), MiniLM's tokenizer (vocabulary 30522)."""
    from transformers import AutoConfig, AutoModel

    from sr_jax.text.encoder import resolve

    heads = width // 64
    kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
    config = AutoConfig.for_model(
        family, vocab_size=30522, hidden_size=width, intermediate_size=intermediate or -(-width * 8 // 3 // 64) * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
        max_position_embeddings=4096, pad_token_id=0, eos_token_id=102,
    )  # fmt: skip
    folder = root / f"random-{family}-{layers}x{width}"
    AutoModel.from_config(config).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_bytes((resolve("all-MiniLM-L6-v2") / "tokenizer.json").read_bytes())
    return folder


def torch_rows(folder: Path, texts: list[str], lengths: list[int], batch: int, dtype: str, repeats: int) -> list:
    try:
        import torch
        from transformers import AutoModel
    except ImportError:
        return []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if dtype == "bfloat16" and device == "cuda" else torch.float32
    model = AutoModel.from_pretrained(str(folder), dtype=tdtype, attn_implementation="sdpa").to(device).eval()
    name = type(model).__name__
    rows = []
    for length in lengths:
        ids = torch.randint(1000, 20000, (batch, length), device=device)

        def run(ids):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.sum().item()

        rows.append(
            {
                "path": f"torch {name} {str(tdtype).split('.')[-1]} {device} (SDPA), model only",
                "length": length,
                "texts_per_s": batch / median_time(repeats, run, ids),
            }
        )
    if name != "BertModel":
        return rows
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return rows
    st = SentenceTransformer(str(folder), device=device)
    if tdtype == torch.bfloat16:
        st = st.to(torch.bfloat16)
    start = time.perf_counter()
    st.encode(texts)  # its defaults: batch 32, sorted by length, each batch padded to its longest text
    rows.append(
        {
            "path": f"sentence-transformers encode() {str(tdtype).split('.')[-1]}, end to end",
            "length": "texts",
            "texts_per_s": len(texts) / (time.perf_counter() - start),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--random", default=None, help="a decoder family with random weights instead (needs torch)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=0, help="MLP width of --random (0: 8/3 x width)")
    p.add_argument("--num-texts", type=int, default=100_000)
    p.add_argument("--data", default="../shared/data", help="where the real texts come from")
    p.add_argument("--batch-size", type=int, default=1024, help="rows of the model-only timings")
    p.add_argument("--encode-batch-size", type=int, default=None, help="end to end (default: the encoder's)")
    p.add_argument("--lengths", default="32,64")
    p.add_argument("--dtype", default="bfloat16" if jax.default_backend() == "gpu" else "float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    pool = real_texts(Path(args.data))
    texts = [pool[i % len(pool)] for i in range(args.num_texts)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = (
            random_decoder(args.random, args.layers, args.width, args.intermediate, Path(tmp))
            if args.random
            else args.encoder
        )
        encoder = load_encoder(spec, batch_size=args.encode_batch_size, dtype=args.dtype)
        root = text_dataset(texts, Path(tmp) / "ds")
        start = time.perf_counter()
        build_text_cache(root, encoder, chunk_size=8192)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "path": f"sr-jax build_text_cache {args.dtype} (batch {encoder.batch_size}), end to end",
                "length": f"texts (mean {encoder.tokens_seen / len(texts):.0f} tokens)",
                "texts_per_s": len(texts) / seconds,
                "tokens_per_s": encoder.tokens_seen / seconds,
            }
        )
        rows += model_rows(encoder, lengths, args)
        rows += torch_rows(encoder.spec.folder, texts, lengths, args.batch_size, args.dtype, args.repeats)
    for row in rows:
        if isinstance(row["length"], int):
            row["tokens_per_s"] = row["texts_per_s"] * row["length"]
    device = jax.devices()[0].device_kind
    what = f"random {args.random} {args.layers}x{args.width}" if args.random else args.encoder
    print(f"\n{what}: {args.num_texts} texts, batch {args.batch_size}, {device} ({jax.default_backend()})\n")
    print("| path | length | texts/s | tokens/s |\n|---|---|---|---|")
    for r in rows:
        tokens = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "n/a"
        print(f"| {r['path']} | {r['length']} | {r['texts_per_s']:,.0f} | {tokens} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": what, "device": device, "rows": rows}, indent=2) + "\n")
    return rows


def model_rows(encoder, lengths: list[int], args: argparse.Namespace) -> list[dict]:
    rows = []
    for length in lengths:
        ids = jnp.asarray(np.random.default_rng(0).integers(1000, 20000, (args.batch_size, length)), jnp.int32)
        mask = jnp.ones_like(ids)
        seconds = median_time(args.repeats, lambda i, m: jax.block_until_ready(encoder.forward(i, m)), ids, mask)
        rows.append(
            {
                "path": f"sr-jax Flax {type(encoder.spec.config).__name__[:-6]} {args.dtype}, model only",
                "length": length,
                "texts_per_s": args.batch_size / seconds,
            }
        )
    return rows


if __name__ == "__main__":
    cli.interruptible(main)
