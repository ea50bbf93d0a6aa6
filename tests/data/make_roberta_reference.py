"""Makes `tiny_roberta/` (a random RoBERTa checkpoint in Hugging Face layout) and `roberta_reference.npz`
(transformers' RobertaModel outputs on it), for the parity test of RoBERTa's position ids.

Run once, in an environment with torch and transformers (not a dependency of sr-jax):
    python tests/data/make_roberta_reference.py tests/data
RoBERTa numbers the non-padding tokens from pad_token_id + 1 (here 2) and puts padding at pad_token_id; the
inputs are right-padded with the pad token, one of them as long as the position table allows (40 tokens).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import RobertaConfig, RobertaModel

LENGTHS = (40, 17, 5, 1)


def main(out: str) -> None:
    out = Path(out)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=42,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = RobertaModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(out / "tiny_roberta", safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = np.full((len(LENGTHS), max(LENGTHS)), config.pad_token_id, np.int64)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = rng.integers(3, config.vocab_size, length)
        ids[row, 0], ids[row, length - 1] = config.bos_token_id, config.eos_token_id
    mask = (ids != config.pad_token_id).astype(np.int64)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    np.savez_compressed(
        out / "roberta_reference.npz", ids=ids, mask=mask, hidden=hidden.numpy(), torch_version=torch.__version__
    )
    print(f"wrote {out / 'tiny_roberta'} and {out / 'roberta_reference.npz'}: hidden {tuple(hidden.shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
