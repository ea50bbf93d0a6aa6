"""Fill a dataset's text-embedding cache: `python -m train.encode_text --data DIR --encoder SPEC`.

SPEC is `hashed-bow`, a packaged encoder name (`all-MiniLM-L6-v2`) or a checkpoint folder: a BERT-family
encoder or a decoder language model (Llama, Mistral, Qwen2/3, GLM, Gemma; docs/TEXT_FEATURES.md). Feature
options come after a `?` in SPEC or from the flags below (which add them to SPEC); the command prints the
`data.text_encoder=...` value that trains on this cache. Big models: `--dtype bfloat16` and
`--mesh-model N` (the model split over N devices, batches over the rest).

Resumable: run the same command again after an interruption and finished chunks are kept.
"""

from __future__ import annotations

import argparse
import time

from sr_jax.config import MeshConfig
from sr_jax.data.store import open_dataset
from sr_jax.text import build_text_cache, get_featurizer
from sr_jax.text.encoder import Options, split_spec
from sr_jax.sharding import make_mesh
from train import cli


def with_options(spec: str, args: argparse.Namespace) -> str:
    """SPEC with the option flags that were given added to its `?` options (a flag wins over SPEC)."""
    base, options = split_spec(spec)
    given = {"pooling": args.pooling, "dim": args.dim, "normalize": args.normalize, "instruction": args.instruction,
             "eos": args.eos, "max_length": args.max_length}  # fmt: skip
    query = Options(**{**vars(options), **{k: v for k, v in given.items() if v is not None}}).query()
    return f"{base}?{query}" if query else base


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--encoder", required=True, help="hashed-bow, a packaged name or a checkpoint folder [?options]")
    p.add_argument("--chunk-size", type=int, default=8192, help="texts per saved chunk (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=None, help="texts per encoder call (default: 16 on CPU, else 256)")
    p.add_argument("--dtype", default="float32", help="encoder compute dtype: float32, or bfloat16 on accelerators")
    p.add_argument("--mesh-model", type=int, default=0, help="split the model over this many devices (0: one device)")
    p.add_argument("--pooling", choices=["mean", "cls", "last"], default=None)
    p.add_argument("--dim", type=int, default=None, help="Matryoshka: keep the first DIM channels")
    p.add_argument("--normalize", type=lambda s: s.lower() in ("true", "1"), default=None, help="true | false")
    p.add_argument("--instruction", default=None, help="prefix of query texts (an embedding model's prompt)")
    p.add_argument("--eos", type=lambda s: s.lower() in ("true", "1"), default=None, help="append EOS: true | false")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text")
    args = p.parse_args(argv)
    cli.setup()
    spec = args.encoder if args.encoder == "hashed-bow" else with_options(args.encoder, args)
    mesh = make_mesh(MeshConfig(data=0, model=args.mesh_model)) if args.mesh_model else None
    featurizer = get_featurizer(spec, batch_size=args.batch_size, dtype=args.dtype, mesh=mesh)
    start = time.perf_counter()
    build_text_cache(args.data, featurizer, chunk_size=args.chunk_size)
    n = open_dataset(args.data).meta.num_texts
    elapsed = time.perf_counter() - start
    tokens = getattr(featurizer, "tokens_seen", 0)
    rate = f"{n / elapsed:,.0f} texts/s" + (f", {tokens / elapsed:,.0f} tokens/s" if tokens else "")
    print(f"{n} texts encoded by {featurizer.fingerprint()} in {elapsed:.1f} s ({rate})")
    print(f"train on it with: data.text_encoder='{spec}'")


if __name__ == "__main__":
    cli.interruptible(main)
