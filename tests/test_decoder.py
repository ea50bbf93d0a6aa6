"""Decoder language models as text featurizers: parity with transformers' PyTorch models for every family
(references made by tests/data/make_decoder_references.py), config reading, sharded and broken weight files,
feature options, tensor-parallel sharding on 8 CPU devices, the memory check, conversion, and the whole path
from `train.encode_text` to a trained model."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from helpers import TINY, config
from sr_jax.config import MeshConfig
from sr_jax.data import synthetic
from sr_jax.data.store import open_dataset
from sr_jax.text import build_text_cache, load_encoder, text_identity
from sr_jax.text.decoder import DecoderConfig
from sr_jax.text.encoder import abstract_module, describe, load_params
from sr_jax.text.featurizer import prompted_texts
from sr_jax import memory
from sr_jax.training import trainer
from sr_jax.sharding import make_mesh
from train import convert, encode_text

DATA = Path(__file__).parent / "data"
FOLDERS = DATA / "tiny_decoders"
REF = np.load(DATA / "decoder_reference.npz")
TEXTS = [str(t) for t in REF["texts"]]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "glm", "glm4", "gemma")


def spec_of(family: str, **options) -> str:
    """The reference's settings: 24 tokens; qwen3 appends EOS, as Qwen3-Embedding does."""
    options = {"max_length": 24, **({"eos": "true"} if family == "qwen3" else {}), **options}
    return f"{FOLDERS / family}?" + "&".join(f"{k}={v}" for k, v in options.items())


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def padded(ids, mask, left: bool):
    """The reference's right-padded rows, moved to the left when `left`."""
    if not left:
        return ids, mask
    out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
    for r, n in enumerate(mask.sum(1)):
        out_ids[r, -n:], out_mask[r, -n:] = ids[r, :n], 1
    return out_ids, out_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(family):
    """Token ids (one text truncated at the maximum length), last hidden states with either padding, and both
    poolings of the featurizer, against transformers' PyTorch model of the family on the same weights."""
    spec = describe(spec_of(family))
    assert spec.config.model_type == family
    model = nnx.merge(nnx.graphdef(abstract_module(spec)), load_params(spec))
    ids, mask = REF[f"{family}/ids"], REF[f"{family}/mask"].astype(np.int32)
    real = mask.astype(bool)
    for left in (False, True):
        i, m = padded(ids, mask, left)
        hidden = np.asarray(model(jnp.asarray(i), jnp.asarray(m)))
        ours = hidden[m.astype(bool)]  # real tokens in order, whichever side the padding is on
        np.testing.assert_allclose(ours, REF[f"{family}/hidden"][real], rtol=1e-4, atol=1e-4)
    encoder = load_encoder(spec_of(family))
    assert [len(x) for x in encoder.tokenize(TEXTS)] == mask.sum(1).tolist() and max(mask.sum(1)) == 24
    assert all(list(ids[r, : m.sum()]) == x for r, (m, x) in enumerate(zip(mask, encoder.tokenize(TEXTS))))
    for side in ("left", "right"):
        encoder.spec = dataclasses.replace(encoder.spec, padding_side=side)
        pooled, summary = encoder.featurize(TEXTS)
        assert cosine(pooled, REF[f"{family}/last"]).min() >= 0.9999
        np.testing.assert_allclose(summary, REF[f"{family}/last"], rtol=1e-4, atol=1e-4)  # the last token, raw
    mean = load_encoder(spec_of(family, pooling="mean")).encode(TEXTS)
    assert cosine(mean, REF[f"{family}/mean"]).min() >= 0.9999


def test_bfloat16_weights_stay_close():
    encoder = load_encoder(spec_of("qwen2"), dtype="bfloat16")
    assert encoder.params["layers"][0]["attn"]["q"]["kernel"].dtype == jnp.bfloat16  # half the memory
    assert cosine(encoder.encode(TEXTS), REF["qwen2/last"]).min() >= 0.99
    assert encoder.fingerprint() == load_encoder(spec_of("qwen2")).fingerprint()


def test_config_layouts_and_defaults(tmp_path):
    """transformers v5's rope_parameters and the older rope_theta / rope_scaling give the same config; keys
    a file leaves out take the family's transformers defaults; what sr-jax cannot run is refused by name."""
    new = json.loads((FOLDERS / "qwen2" / "config.json").read_text())
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rope = dict(new["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert DecoderConfig.from_file(tmp_path / "config.json") == DecoderConfig.from_file(
        FOLDERS / "qwen2" / "config.json"
    )
    glm = {k: v for k, v in json.loads((FOLDERS / "glm" / "config.json").read_text()).items() if k != "head_dim"}
    glm["rope_parameters"].pop("partial_rotary_factor")
    (tmp_path / "config.json").write_text(json.dumps(glm))
    cfg = DecoderConfig.from_file(tmp_path / "config.json")
    assert cfg.head_dim == 128 and cfg.rotary_dim == 64 and cfg.qkv_bias and not cfg.o_bias  # GLM's defaults
    assert DecoderConfig.from_file(FOLDERS / "mistral" / "config.json").sliding_windows == (8, 8)
    assert DecoderConfig.from_file(FOLDERS / "qwen2" / "config.json").sliding_windows == (None, 6)
    for edit, words in [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope' is not supported"),
        ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not a decoder family"),
        ({"hidden_act": "relu2"}, "hidden_act 'relu2'"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**new, **edit}))
        with pytest.raises(ValueError, match=words):
            DecoderConfig.from_file(tmp_path / "config.json")


def _copy(family: str, dst: Path) -> Path:
    shutil.copytree(FOLDERS / family, dst)
    return dst


def test_sharded_weights_and_their_errors(tmp_path):
    """llama's checkpoint is in two shards with an index (as transformers saves it); broken indexes and shards
    are errors naming the file and tensor."""
    folder = _copy("llama", tmp_path / "llama")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    spec = spec_of("llama").replace(str(FOLDERS / "llama"), str(folder))
    reference = load_encoder(spec).encode(TEXTS)
    np.testing.assert_array_equal(reference, load_encoder(spec_of("llama")).encode(TEXTS))

    def broken(edit_index=None, edit_shard=None):
        shutil.rmtree(folder)
        _copy("llama", folder)
        if edit_index:
            edit_index(index_copy := json.loads(json.dumps(index)))
            (folder / "model.safetensors.index.json").write_text(json.dumps(index_copy))
        if edit_shard:
            edit_shard(folder / "model-00002-of-00002.safetensors")
        return spec

    key = next(k for k, f in index["weight_map"].items() if f.endswith("00001-of-00002.safetensors"))
    cases = [
        (dict(edit_index=lambda i: i["weight_map"].update({key: "model-00003-of-00003.safetensors"})),
         FileNotFoundError, "lists model-00003-of-00003.safetensors, which is missing"),
        (dict(edit_index=lambda i: i["weight_map"].pop(key)), ValueError, f"tensor '{key}' is not listed in"),
        (dict(edit_index=lambda i: i.pop("weight_map")), ValueError, "not a safetensors index"),
        (dict(edit_shard=lambda f: f.write_bytes(f.read_bytes()[:-100])), ValueError, "is truncated or misdescribed"),
        (dict(edit_shard=lambda f: f.write_bytes(b"\xff" * 16)), ValueError, "not a safetensors file"),
    ]  # fmt: skip
    for edits, error, words in cases:
        with pytest.raises(error, match=words):
            load_encoder(broken(**edits))
    # an unknown and a misshapen tensor, each in a third shard that the index lists
    unknown, norm = "model.layers.0.self_attn.extra.weight", "model.norm.weight"
    for tensors, words in [
        ({unknown: np.zeros(3, np.float32)}, f"'{unknown}' is unknown"),
        ({norm: np.zeros(7, np.float32)}, rf"'{norm}' has shape \(7,\), the config implies \(48,\)"),
    ]:
        broken()
        if norm in tensors:  # moved out of its shard
            _drop(folder, norm, index)
        save_file(tensors, str(folder / "model-00003-of-00003.safetensors"))
        new = json.loads(json.dumps(index))
        new["weight_map"].update({k: "model-00003-of-00003.safetensors" for k in tensors})
        (folder / "model.safetensors.index.json").write_text(json.dumps(new))
        with pytest.raises((KeyError, ValueError), match=words):
            load_encoder(spec)
    broken()
    _drop(folder, "model.layers.1.mlp.up_proj.weight", index)
    new = json.loads(json.dumps(index))
    new["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    (folder / "model.safetensors.index.json").write_text(json.dumps(new))
    with pytest.raises(KeyError, match="missing weight 'layers.1.mlp.up_proj.weight'"):
        load_encoder(spec)


def _drop(folder: Path, key: str, index: dict) -> None:
    """Rewrites the shard holding `key` without it."""
    from sr_jax.text.hf_weights import Weights

    shard = folder / index["weight_map"][key]
    weights = Weights(folder)
    kept = {k: np.asarray(weights[k]) for k in weights.keys() if k != key and weights.source(k).startswith(str(shard))}
    save_file(kept, str(shard))


def test_options_enter_the_fingerprint_and_shape_the_features(tmp_path):
    base = describe(spec_of("qwen2"))
    variants = {o: describe(spec_of("qwen2", **{k: v})) for o, (k, v) in {
        "mean": ("pooling", "mean"), "dim": ("dim", 16), "norm": ("normalize", "true"), "eos": ("eos", "true"),
        "instruction": ("instruction", "Query: "), "length": ("max_length", 16)}.items()}  # fmt: skip
    prints = {base.fingerprint} | {v.fingerprint for v in variants.values()}
    assert len(prints) == 1 + len(variants)  # every option changes the fingerprint
    assert len({base.name} | {v.name for v in variants.values()}) == 1 + len(variants)  # and the cache's name
    full = load_encoder(spec_of("qwen2")).encode(TEXTS)
    short = load_encoder(spec_of("qwen2", dim=16, normalize="true")).encode(TEXTS)
    assert short.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="unknown text encoder option 'pool'"):
        describe(f"{FOLDERS / 'qwen2'}?pool=mean")
    with pytest.raises(ValueError, match="option dim='half': expected a whole number"):
        describe(f"{FOLDERS / 'qwen2'}?dim=half")
    with pytest.raises(ValueError, match="pooling 'cls' is not one of"):
        describe(f"{FOLDERS / 'qwen2'}?pooling=cls")
    # sentence-transformers files state the defaults (Qwen3-Embedding's layout): last token, normalised, prompted
    folder = _copy("qwen3", tmp_path / "qwen3-embedding")
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    prompt = "Instruct: Given a query, retrieve products\nQuery:"
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": prompt}}))
    stated = describe(folder).pooling
    assert (stated.method, stated.normalize, stated.instruction) == ("last", True, prompt)


def test_query_instruction_prompts_query_texts_only(tmp_path):
    root = tmp_path / "ds"
    synthetic.generate(TINY, root)
    encoder = load_encoder(spec_of("qwen2", instruction="Query: "))
    dataset = open_dataset(root)
    queries = np.unique(dataset.split("train")["query_text"])
    queries = queries[queries >= 0]
    prompted = prompted_texts(root, encoder.query_prefix)
    texts = dataset.texts()
    assert prompted[queries[0]] == "Query: " + texts[queries[0]]
    items = np.unique(dataset.split("train")["item_text"])
    assert all(prompted[r] == texts[r] for r in items[:20] if r not in set(queries))
    build_text_cache(root, encoder, progress=False)
    pooled, _ = open_dataset(root).text_cache(encoder.name)
    np.testing.assert_allclose(pooled[queries[0]], encoder.encode(["Query: " + texts[queries[0]]])[0], atol=1e-5)


def test_tensor_parallel_on_eight_devices():
    """Parameters split over `model` (4), batches over `data` (2): the same vectors as one device."""
    mesh = make_mesh(MeshConfig(data=2, model=4), jax.devices()[:8])
    sharded = load_encoder(spec_of("llama"), batch_size=8, mesh=mesh)
    layer = sharded.params["layers"][0]
    assert layer["attn"]["q"]["kernel"].sharding.spec == P(None, "model")  # heads' columns
    assert layer["attn"]["o"]["kernel"].sharding.spec == P("model", None)  # and back by rows
    assert layer["mlp"]["down"]["kernel"].sharding.spec == P("model", None)
    assert sharded.params["embed"]["embedding"].sharding.spec == P("model", None)
    assert layer["attn_norm"]["weight"].sharding.spec == P()
    shard = layer["mlp"]["up"]["kernel"].addressable_shards[0].data
    assert shard.shape == (48, 20)  # 80 columns over 4 devices
    np.testing.assert_allclose(sharded.encode(TEXTS), load_encoder(spec_of("llama")).encode(TEXTS), atol=1e-5)


def test_memory_check_refuses_before_reading_weights(monkeypatch):
    monkeypatch.setattr(memory, "device_capacity", lambda device, devices_in_use=None: 1 << 16)

    def never(*args):
        raise AssertionError("weights were read")

    monkeypatch.setattr("sr_jax.text.hf_weights.Weights.__getitem__", never)
    with pytest.raises(
        memory.OutOfMemoryError, match=r"(?s)text encoder qwen2\+\w+ \(float32, batch 16\).*--mesh-model"
    ):
        load_encoder(spec_of("qwen2"))


def test_hf_to_orbax_keeps_options_and_shards_on_restore(tmp_path):
    src = spec_of("glm", dim=32, normalize="true")
    dst = tmp_path / "glm-orbax"
    convert.main(["hf-to-orbax", "--src", src, "--dst", str(dst), "--dtype", "bfloat16"])
    original = load_encoder(src, dtype="bfloat16")
    converted = load_encoder(dst, dtype="bfloat16")
    assert converted.fingerprint() == original.fingerprint() and converted.name == original.name
    np.testing.assert_array_equal(converted.encode(TEXTS), original.encode(TEXTS))
    mesh = make_mesh(MeshConfig(data=1, model=2), jax.devices()[:2])
    restored = load_encoder(dst, dtype="bfloat16", mesh=mesh)
    assert restored.params["layers"][0]["mlp"]["gate"]["kernel"].sharding.spec == P(None, "model")
    np.testing.assert_allclose(restored.encode(TEXTS), original.encode(TEXTS), atol=2e-2)


def test_encode_text_then_train_end_to_end(tmp_path, capsys):
    """`train.encode_text` fills the cache with a tiny random decoder; the full model trains on those features."""
    root = tmp_path / "ds"
    synthetic.generate(TINY, root)
    spec = spec_of("qwen3", dim=32, normalize="true")
    encode_text.main(["--data", str(root), "--encoder", spec, "--chunk-size", "64", "--batch-size", "32"])
    assert "tokens/s" in capsys.readouterr().out
    name, fingerprint = text_identity(spec)
    info = open_dataset(root).meta.text_caches[name]
    assert info.fingerprint == fingerprint and info.dim == 32
    cfg = config(TINY, data={"path": str(root), "text_encoder": spec}, train={"epochs": 2.0})
    result = trainer.fit(cfg, tmp_path / "run")
    assert result["overall"]["auc"] > 0.6, result["overall"]  # a constant predictor scores 0.5
    run_info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (run_info["text_encoder"], run_info["text_fingerprint"]) == (name, fingerprint)
