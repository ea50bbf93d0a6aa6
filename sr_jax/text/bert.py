"""A BERT-family text encoder in Flax NNX (BERT, MiniLM, RoBERTa and relatives), loaded from Hugging Face
files.

No PyTorch: the config comes from `config.json`, the weights from safetensors (keys with or without a
`bert.` / `roberta.` prefix; `hf_weights.py`), the tokenizer from `tokenizer.json` (the `tokenizers`
library). The encoder is frozen: it is only ever called under jit to fill a dataset's text cache
(`encoder.py` pools and loads it).

BERT numbers positions 0..L-1. RoBERTa (and XLM-RoBERTa) number the non-padding tokens from
pad_token_id + 1 and give padding the position pad_token_id (transformers'
`create_position_ids_from_input_ids`), so its usable length is max_position_embeddings - pad_token_id - 1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.text.hf_weights import Entry, copy, transposed


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"
    pad_token_id: int = 0

    @property
    def roberta_positions(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        offset = self.pad_token_id + 1 if self.roberta_positions else 0
        return self.max_position_embeddings - offset

    @classmethod
    def from_file(cls, path: str | Path) -> BertConfig:
        data = json.loads(Path(path).read_text())
        if data.get("model_type", "bert") not in ("bert", *ROBERTA_TYPES):
            raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not a BERT-family encoder")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {data['position_embedding_type']!r} is not supported")
        if data.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {data['hidden_act']!r}: expected one of {sorted(_ACTIVATIONS)}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


ROBERTA_TYPES = ("roberta", "xlm-roberta")
_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class _Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, dtype: jnp.dtype):
        h, i = cfg.hidden_size, cfg.intermediate_size
        dense = lambda a, b: nnx.Linear(a, b, dtype=dtype, rngs=rngs)  # noqa: E731
        norm = lambda: nnx.LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=jnp.float32, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value, self.attn_out = (dense(h, h) for _ in range(4))
        self.attn_norm, self.out_norm = norm(), norm()
        self.intermediate, self.output = dense(h, i), dense(i, h)
        self.heads, self.act, self.dtype = cfg.num_attention_heads, _ACTIVATIONS[cfg.hidden_act], dtype

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, L, H], bias [B, 1, 1, L] (0 or -inf-like for padding) -> [B, L, H]"""
        b, length, h = x.shape
        split = lambda t: t.reshape(b, length, self.heads, h // self.heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / np.sqrt(h // self.heads) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, length, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class BertEncoder(nnx.Module):
    """Token ids -> last hidden states [B, L, H]. Matmuls run in `dtype` (float32 or bfloat16); layer norms,
    softmax and the residual stream stay float32, and parameters are float32 either way."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.pad_token_id = cfg.pad_token_id if cfg.roberta_positions else None
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([_Layer(cfg, rngs, dtype) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids, mask [B, L] int32 -> hidden [B, L, H] float32"""
        if self.pad_token_id is None:
            positions = jnp.arange(ids.shape[1])[None, :]
        else:  # RoBERTa: non-padding tokens count from pad_token_id + 1, padding sits at pad_token_id
            real = (ids != self.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + self.pad_token_id
        x = self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids))
        x = self.embed_norm(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def hf_key_map(cfg: BertConfig) -> dict[str, Entry]:
    """Hugging Face key (after an optional `bert.` / `roberta.` prefix) -> where it goes in BertEncoder."""
    keys = {
        "embeddings.word_embeddings.weight": copy(("word", "embedding")),
        "embeddings.position_embeddings.weight": copy(("position", "embedding")),
        "embeddings.token_type_embeddings.weight": copy(("token_type", "embedding")),
        "embeddings.LayerNorm.weight": copy(("embed_norm", "scale")),
        "embeddings.LayerNorm.bias": copy(("embed_norm", "bias")),
    }
    parts = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attn_out",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "out_norm"}
    for n in range(cfg.num_hidden_layers):
        for hf, ours in parts.items():
            keys[f"encoder.layer.{n}.{hf}.weight"] = transposed(("layers", n, ours, "kernel"))
            keys[f"encoder.layer.{n}.{hf}.bias"] = copy(("layers", n, ours, "bias"))
        for hf, ours in norms.items():
            keys[f"encoder.layer.{n}.{hf}.weight"] = copy(("layers", n, ours, "scale"))
            keys[f"encoder.layer.{n}.{hf}.bias"] = copy(("layers", n, ours, "bias"))
    return keys


# Present in checkpoints, not used by an encoder that pools itself.
IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.dense.weight", "pooler.dense.bias")
PREFIXES = ("bert.", "roberta.")
