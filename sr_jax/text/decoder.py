"""Decoder language models as text featurizers in Flax NNX: Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4 and Gemma.

One module covers the families; `DecoderConfig.from_file` reads a checkpoint's `config.json` (old
`rope_theta`/`rope_scaling` keys or transformers v5's `rope_parameters`) and fills what the file leaves out
with the family's transformers defaults, and the family's traits say what differs:

| family  | q/k/v bias     | o bias         | MLP                 | other                                      |
|---------|----------------|----------------|---------------------|--------------------------------------------|
| llama   | attention_bias | attention_bias | gate, up (mlp_bias) |                                            |
| mistral | no             | no             | gate, up            | sliding window on every layer              |
| qwen2   | yes            | no             | gate, up            | sliding window where `layer_types` says    |
| qwen3   | attention_bias | attention_bias | gate, up            | RMSNorm of q and k per head; as qwen2      |
| glm     | attention_bias | no             | fused gate_up       | partial (0.5), interleaved rotary          |
| glm4    | attention_bias | no             | fused gate_up       | as glm, plus post-attention/MLP norms      |
| gemma   | attention_bias | attention_bias | gate, up (GeGLU)    | embeddings x sqrt(hidden), norm (1 + w)    |

Padding may be on either side: positions count real tokens only (position = number of real tokens before
it), a query attends to real keys at or before it, so a text's vectors do not depend on its padding.
Rotary scaling: default, linear, llama3 and yarn; other kinds are refused by name. Dynamic NTK and longrope
change only beyond the pretraining length, which text features do not reach; they are refused too rather
than silently treated as default.

Matmuls run in `dtype` with parameters stored in it (bf16 halves a big model's memory); RMSNorm, softmax and
the rotary angles are computed in float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sr_jax.text.hf_weights import Entry, copy, split_transposed, transposed

# What transformers assumes when config.json leaves a key out (use_diff=True saves only non-defaults).
_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "partial_rotary_factor": 1.0,
    "pad_token_id": None,
    "eos_token_id": None,
}
FAMILY_DEFAULTS = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {"sliding_window": 4096},
    "qwen3": {"head_dim": 128, "sliding_window": 4096},
    "glm": {"head_dim": 128, "attention_bias": True, "rms_norm_eps": 1.5625e-07, "partial_rotary_factor": 0.5},
    "glm4": {"head_dim": 128, "attention_bias": True, "rms_norm_eps": 1.5625e-07, "partial_rotary_factor": 0.5},
    "gemma": {"head_dim": 256, "hidden_act": "gelu_pytorch_tanh"},
}
FAMILIES = tuple(FAMILY_DEFAULTS)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    rope: tuple[tuple[str, object], ...]  # rope_parameters as sorted (key, value) pairs
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer: attend to at most this many positions back (None: all)
    pad_token_id: int | None
    eos_token_id: int | None

    @property
    def rope_parameters(self) -> dict:
        return dict(self.rope)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0))

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_file(cls, path: str | Path) -> DecoderConfig:
        path = Path(path)
        raw = json.loads(path.read_text())
        family = raw.get("model_type")
        if family not in FAMILY_DEFAULTS:
            raise ValueError(f"{path}: model_type {family!r} is not a decoder family sr-jax has: {list(FAMILIES)}")
        data = _DEFAULTS | FAMILY_DEFAULTS[family] | raw
        if family == "gemma":  # early Gemma configs: hidden_activation, or "gelu" meaning the tanh approximation
            act = data.get("hidden_activation") or data["hidden_act"]
            data["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" else act
        if data["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {data['hidden_act']!r}: expected one of {sorted(ACTIVATIONS)}")
        rope = _rope_parameters(path, data)
        layers = data["num_hidden_layers"]
        eos = data["eos_token_id"]
        return cls(
            model_type=family,
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data["head_dim"] or data["hidden_size"] // data["num_attention_heads"],
            max_position_embeddings=data["max_position_embeddings"],
            rms_norm_eps=data["rms_norm_eps"],
            hidden_act=data["hidden_act"],
            rope=tuple(sorted(rope.items())),
            qkv_bias=family == "qwen2" or (family != "mistral" and data["attention_bias"]),
            o_bias=family in ("llama", "qwen3", "gemma") and data["attention_bias"],
            mlp_bias=family == "llama" and data["mlp_bias"],
            sliding_windows=_sliding_windows(family, data, layers),
            pad_token_id=data["pad_token_id"],
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def _rope_parameters(path: Path, data: dict) -> dict:
    """transformers v5's rope_parameters from either config layout, checked."""
    rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", data["rope_theta"])
    rope.setdefault("partial_rotary_factor", data["partial_rotary_factor"])
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", data["max_position_embeddings"])
    if rope["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"{path}: rope type {rope['rope_type']!r} is not supported; sr-jax has {list(ROPE_TYPES)}")
    return rope


def _sliding_windows(family: str, data: dict, layers: int) -> tuple[int | None, ...]:
    window = data["sliding_window"]
    if family == "mistral":
        return (window,) * layers
    if family not in ("qwen2", "qwen3"):
        return (None,) * layers
    types = data.get("layer_types") or [
        "sliding_attention" if data["use_sliding_window"] and window and i >= data["max_window_layers"] else "full"
        for i in range(layers)
    ]
    return tuple(window if t == "sliding_attention" else None for t in types)


def inverse_frequencies(cfg: DecoderConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [rotary_dim / 2] float32, attention factor), as transformers' rope init functions."""
    rope, dim = cfg.rope_parameters, cfg.rotary_dim
    base, kind = rope["rope_theta"], rope["rope_type"]
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    if kind == "linear":
        return inv / np.float32(rope["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        return _yarn(cfg, rope, dim, base)
    return inv, 1.0


def _yarn(cfg: DecoderConfig, rope: dict, dim: int, base: float) -> tuple[np.ndarray, float]:
    factor = rope.get("factor") or cfg.max_position_embeddings / rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    original = rope["original_max_position_embeddings"]

    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(fast), correction(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * freqs)) * (1 - extrapolation) + (1.0 / freqs) * extrapolation
    return inv.astype(np.float32), float(attention)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, offset: bool, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jnp.zeros(dim, dtype) if offset else jnp.ones(dim, dtype))
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] in float32 -> the same, normalised and scaled (Gemma: by 1 + weight)."""
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(jnp.float32)
        return x * (1.0 + weight if self.offset else weight)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotary embedding of the first 2 * cos.shape[-1] channels of x [B, L, N, D]; cos, sin [B, L, 1, R/2].
    Halves (Llama): channel i pairs with i + R/2. Interleaved (GLM): channel 2i pairs with 2i + 1."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    else:
        a, b = rot[..., :half], rot[..., half:]
        rot = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, window: int | None, dtype, rngs: nnx.Rngs):
        h, n, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        linear = lambda a, b, bias: nnx.Linear(a, b, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)  # noqa: E731
        self.q, self.k, self.v = (
            linear(h, n * d, cfg.qkv_bias),
            linear(h, k * d, cfg.qkv_bias),
            linear(h, k * d, cfg.qkv_bias),
        )
        self.o = linear(n * d, h, cfg.o_bias)
        qk_norm = cfg.model_type == "qwen3"
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, False, dtype, rngs) if qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, False, dtype, rngs) if qk_norm else None
        self.heads, self.kv_heads, self.head_dim, self.window = n, k, d, window
        self.interleaved = cfg.model_type in ("glm", "glm4")

    def __call__(self, x, cos, sin, positions, mask):
        """x [B, L, H]; cos, sin [B, L, 1, R/2]; positions, mask [B, L] -> [B, L, H]"""
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q).astype(x.dtype), self.k_norm(k).astype(x.dtype)
        q, k = rotate(q, cos, sin, self.interleaved), rotate(k, cos, sin, self.interleaved)
        back = positions[:, :, None] - positions[:, None, :]  # [B, Lq, Lk]: how far key k lies before query q
        allowed = (back >= 0) & (mask[:, None, :] > 0)
        if self.window is not None:
            allowed &= back < self.window
        out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=self.head_dim**-0.5)
        return self.o(out.reshape(b, length, self.heads * self.head_dim))


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, dtype, rngs: nnx.Rngs):
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        linear = lambda a, b: nnx.Linear(a, b, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)  # noqa: E731
        self.gate, self.up, self.down = linear(h, i), linear(h, i), linear(i, h)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, window: int | None, dtype, rngs: nnx.Rngs):
        offset, eps = cfg.model_type == "gemma", cfg.rms_norm_eps
        norm = lambda: RMSNorm(cfg.hidden_size, eps, offset, dtype, rngs)  # noqa: E731
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = (
            norm(),
            Attention(cfg, window, dtype, rngs),
            norm(),
            MLP(cfg, dtype, rngs),
        )
        post = cfg.model_type == "glm4"
        self.attn_post_norm, self.mlp_post_norm = (norm(), norm()) if post else (None, None)
        self.dtype = dtype

    def __call__(self, x, cos, sin, positions, mask):
        """x [B, L, H] float32 residual stream -> the same."""
        y = self.attn(self.attn_norm(x).astype(self.dtype), cos, sin, positions, mask)
        x = x + (y if self.attn_post_norm is None else self.attn_post_norm(y))
        y = self.mlp(self.mlp_norm(x).astype(self.dtype))
        return x + (y if self.mlp_post_norm is None else self.mlp_post_norm(y))


class DecoderLM(nnx.Module):
    """Token ids and attention mask [B, L] (padding on either side) -> last hidden states [B, L, H] float32
    (after the final norm, as transformers' base model returns them)."""

    def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Block(cfg, w, dtype, rngs) for w in cfg.sliding_windows])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.model_type == "gemma", dtype, rngs)
        inv, self.attention_factor = inverse_frequencies(cfg)
        self.inv_freq = tuple(inv.tolist())  # static: a constant of the config, not a weight
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.model_type == "gemma" else None
        self.dtype = dtype

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, L]: real tokens count from 0
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(self.inv_freq, jnp.float32)  # [B, L, R/2]
        cos = (jnp.cos(angles) * self.attention_factor)[:, :, None].astype(self.dtype)
        sin = (jnp.sin(angles) * self.attention_factor)[:, :, None].astype(self.dtype)
        x = self.embed(ids)
        if self.embed_scale is not None:  # Gemma: the scale rounded to the compute dtype, as transformers does
            x = x * jnp.asarray(self.embed_scale, self.dtype)
        x = x.astype(jnp.float32)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask)
        return self.norm(x)


def hf_key_map(cfg: DecoderConfig) -> dict[str, Entry]:
    """Hugging Face key (without the `model.` prefix) -> where it goes in DecoderLM's parameters."""
    keys = {"embed_tokens.weight": copy(("embed", "embedding")), "norm.weight": copy(("norm", "weight"))}
    linears = {"self_attn.q_proj": ("attn", "q"), "self_attn.k_proj": ("attn", "k"), "self_attn.v_proj": ("attn", "v"),
               "self_attn.o_proj": ("attn", "o"), "mlp.down_proj": ("mlp", "down")}  # fmt: skip
    biases = {"self_attn.q_proj": cfg.qkv_bias, "self_attn.k_proj": cfg.qkv_bias, "self_attn.v_proj": cfg.qkv_bias,
              "self_attn.o_proj": cfg.o_bias, "mlp.down_proj": cfg.mlp_bias}  # fmt: skip
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
    if cfg.model_type == "glm4":
        norms |= {"post_self_attn_layernorm": "attn_post_norm", "post_mlp_layernorm": "mlp_post_norm"}
    fused = cfg.model_type in ("glm", "glm4")
    if not fused:
        linears |= {"mlp.gate_proj": ("mlp", "gate"), "mlp.up_proj": ("mlp", "up")}
        biases |= {"mlp.gate_proj": cfg.mlp_bias, "mlp.up_proj": cfg.mlp_bias}
    for n in range(cfg.num_hidden_layers):
        layer = f"layers.{n}"
        for hf, ours in linears.items():
            keys[f"{layer}.{hf}.weight"] = transposed(("layers", n, *ours, "kernel"))
            if biases[hf]:
                keys[f"{layer}.{hf}.bias"] = copy(("layers", n, *ours, "bias"))
        if fused:  # GLM's gate_up_proj: gate rows first, then up
            keys[f"{layer}.mlp.gate_up_proj.weight"] = split_transposed(
                ("layers", n, "mlp", "gate", "kernel"), ("layers", n, "mlp", "up", "kernel")
            )
        for hf, ours in norms.items():
            keys[f"{layer}.{hf}.weight"] = copy(("layers", n, ours, "weight"))
        if cfg.model_type == "qwen3":
            keys[f"{layer}.self_attn.q_norm.weight"] = copy(("layers", n, "attn", "q_norm", "weight"))
            keys[f"{layer}.self_attn.k_norm.weight"] = copy(("layers", n, "attn", "k_norm", "weight"))
    return keys


def ignored(key: str) -> bool:
    """Checkpoint tensors a featurizer does not use: the language-model head and rotary buffers."""
    return key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq")


PREFIXES = ("model.",)
