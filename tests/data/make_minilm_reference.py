"""Makes `minilm_reference.npz`: all-MiniLM-L6-v2 outputs from PyTorch for real texts, for the parity test.

Run once, in an environment with torch and transformers (not a dependency of sr-jax):
    python tests/data/make_minilm_reference.py MODEL_DIR ../shared/data tests/data/minilm_reference.npz
It uses transformers' BertModel with the checkpoint's own tokenizer, mean pooling over the attention mask
and L2 normalisation (what sentence-transformers does for this model), and keeps the first-token states.
"""

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel


def real_texts(data: Path) -> list[str]:
    with open(data / "amazon-scientific" / "Scientific.text", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1)[1] for line in list(f)[1:]]
    rows.sort(key=len)
    amazon = rows[:: len(rows) // 14][:14] + rows[-2:] + [" ".join(rows[-6:])]  # short to past 256 tokens
    with open(data / "movielens-latest-small" / "movies.csv", encoding="utf-8") as f:
        movies = list(csv.DictReader(f))
    movie_texts = [f"{m['title']}. {m['genres'].replace('|', ', ')}" for m in movies[::977]]
    with open(data / "movielens-latest-small" / "tags.csv", encoding="utf-8") as f:
        tags = sorted({row["tag"] for row in csv.DictReader(f)})[::400]
    return amazon + movie_texts + tags


def main(model_dir: str, data: str, out: str) -> None:
    texts = real_texts(Path(data))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(mean, dim=-1)
    np.savez_compressed(
        out,
        texts=np.array(texts),
        pooled=pooled.numpy(),
        first=hidden[:, 0].numpy(),
        lengths=batch["attention_mask"].sum(1).numpy(),
        torch_version=torch.__version__,
    )
    print(f"{len(texts)} texts, token lengths {sorted(batch['attention_mask'].sum(1).tolist())}")


if __name__ == "__main__":
    main(*sys.argv[1:])
