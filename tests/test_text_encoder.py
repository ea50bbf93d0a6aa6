"""The BERT-family encoder: parity with PyTorch, loading errors, the bucketed and resumable text cache,
encoder mismatch errors, and orbax conversion."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import TINY, config
from sr_jax.data import synthetic
from sr_jax.data.store import DatasetError, open_dataset
from sr_jax.text import build_text_cache, load_encoder, text_identity
from sr_jax.text.conversion import hf_to_orbax
from sr_jax.text.encoder import resolve
from sr_jax.training import loop, restore, trainer
from sr_jax.featurized import load_dataset
from train import convert, encode_text

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"
ROBERTA = Path(__file__).parent / "data"  # tiny_roberta/ and roberta_reference.npz (make_roberta_reference.py)
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_matches_pytorch_on_real_texts():
    ref = np.load(REFERENCE)
    texts = [str(t) for t in ref["texts"]]
    encoder = load_encoder("all-MiniLM-L6-v2")
    assert encoder.dim == 384 and encoder.max_length == 256 and encoder.spec.normalize
    assert [len(ids) for ids in encoder.tokenize(texts)] == ref["lengths"].tolist()  # incl. one truncated at 256
    pooled, first = encoder.featurize(texts)
    assert cosine(pooled, ref["pooled"]).min() >= 0.99999
    assert cosine(first, ref["first"]).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(encoder.encode(texts[:3]), axis=1), 1.0, rtol=1e-5)
    bf16 = load_encoder("all-MiniLM-L6-v2", dtype="bfloat16")
    assert cosine(bf16.encode(texts), ref["pooled"]).min() >= 0.999
    assert bf16.fingerprint() == encoder.fingerprint()


@pytest.mark.parametrize("prefix", ["", "roberta."])
def test_roberta_positions_match_pytorch(tmp_path, prefix):
    """RoBERTa counts positions from pad_token_id + 1 over the non-padding tokens: transformers' RobertaModel on
    a tiny random checkpoint, right-padded inputs, one as long as the position table allows."""
    import jax.numpy as jnp
    from flax import nnx

    from sr_jax.text.encoder import abstract_module, describe, load_params

    weights = load_file(str(ROBERTA / "tiny_roberta" / "model.safetensors"))
    save_file({prefix + k: v for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(ROBERTA / "tiny_roberta" / "config.json", tmp_path / "config.json")
    shutil.copy(resolve("all-MiniLM-L6-v2") / "tokenizer.json", tmp_path / "tokenizer.json")
    spec = describe(tmp_path)
    cfg = spec.config
    assert cfg.roberta_positions and cfg.max_tokens == 40
    ref = np.load(ROBERTA / "roberta_reference.npz")
    encoder = nnx.merge(nnx.graphdef(abstract_module(spec)), load_params(spec))
    hidden = np.asarray(encoder(jnp.asarray(ref["ids"], jnp.int32), jnp.asarray(ref["mask"], jnp.int32)))
    real = ref["mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], ref["hidden"][real], rtol=1e-4, atol=1e-5)
    # more padding (a wider bucket) leaves the real tokens as they were
    wider = np.pad(ref["ids"][1:], ((0, 0), (0, 24)), constant_values=cfg.pad_token_id)
    out = np.asarray(encoder(jnp.asarray(wider, jnp.int32), jnp.asarray(wider != cfg.pad_token_id, jnp.int32)))
    np.testing.assert_allclose(out[:, :40][real[1:]], ref["hidden"][1:][real[1:]], rtol=1e-4, atol=1e-5)


def _tiny_checkpoint(folder: Path, prefix: str = "", seed: int = 0) -> Path:
    """A random BERT checkpoint in Hugging Face layout (MiniLM's tokenizer, tiny dimensions)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_BERT))
    shutil.copy(resolve("all-MiniLM-L6-v2") / "tokenizer.json", folder / "tokenizer.json")
    rng = np.random.default_rng(seed)
    h, i = TINY_BERT["hidden_size"], TINY_BERT["intermediate_size"]
    tensors = {
        "embeddings.word_embeddings.weight": (30522, h),
        "embeddings.position_embeddings.weight": (64, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for n in range(TINY_BERT["num_hidden_layers"]):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            tensors[f"encoder.layer.{n}.{part}.weight"] = (h, h)
            tensors[f"encoder.layer.{n}.{part}.bias"] = (h,)
        tensors[f"encoder.layer.{n}.intermediate.dense.weight"] = (i, h)
        tensors[f"encoder.layer.{n}.intermediate.dense.bias"] = (i,)
        tensors[f"encoder.layer.{n}.output.dense.weight"] = (h, i)
        tensors[f"encoder.layer.{n}.output.dense.bias"] = (h,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[f"encoder.layer.{n}.{norm}.weight"] = (h,)
            tensors[f"encoder.layer.{n}.{norm}.bias"] = (h,)
    save_file(
        {prefix + k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in tensors.items()},
        str(folder / "model.safetensors"),
    )
    return folder


TEXTS = [
    "cheap espresso grinder",
    "dog leash",
    "Toy Story (1995). Adventure, Animation, Children, Comedy",
    "premium kettlebell for home gym workouts with a long description " * 6,
    "a",
    "vinyl",
    "studio grade zoom lens",
    "budget",
    "baby stroller and crib for the nursery",
    "mystery thriller paperback",
    "x " * 80,
]


def test_bert_prefix_is_optional(tmp_path):
    plain = load_encoder(_tiny_checkpoint(tmp_path / "plain"))
    prefixed = load_encoder(_tiny_checkpoint(tmp_path / "prefixed", prefix="bert."))
    np.testing.assert_array_equal(plain.encode(TEXTS[:3]), prefixed.encode(TEXTS[:3]))
    assert not plain.spec.normalize and plain.max_length == 64  # no sentence-transformers files: raw mean, max length


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (
            lambda w: w.update({"encoder.layer.0.attention.self.extra.weight": np.zeros(3, np.float32)}),
            KeyError,
            "tensor 'encoder.layer.0.attention.self.extra.weight' is unknown to this model",
        ),
        (
            lambda w: w.pop("encoder.layer.1.output.dense.bias"),
            KeyError,
            "missing weight 'encoder.layer.1.output.dense.bias'",
        ),
        (
            lambda w: w.update({"embeddings.LayerNorm.bias": np.zeros(7, np.float32)}),
            ValueError,
            r"tensor 'embeddings.LayerNorm.bias' has shape \(7,\), the config implies \(32,\)",
        ),
    ],
)
def test_loading_errors_name_the_weight(tmp_path, edit, error, words):
    folder = _tiny_checkpoint(tmp_path / "ckpt")
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(error, match=words):
        load_encoder(folder)


def test_missing_files_and_names_are_clear_errors(tmp_path):
    folder = _tiny_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_encoder(folder)
    with pytest.raises(FileNotFoundError, match="no encoder folder"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**TINY_BERT, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one sr-jax can load"):
        load_encoder(tmp_path / "gpt")


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "ds"
    synthetic.generate(TINY, root)
    return root


def test_bucketed_cache_equals_one_text_at_a_time(tmp_path, dataset):
    encoder = load_encoder(_tiny_checkpoint(tmp_path / "ckpt"))
    one_by_one = [encoder.featurize([t]) for t in TEXTS]
    batched = encoder.featurize(TEXTS)
    for k, (p, f) in enumerate(one_by_one):
        np.testing.assert_allclose(batched[0][k], p[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched[1][k], f[0], rtol=1e-5, atol=1e-6)
    build_text_cache(dataset, encoder, chunk_size=32, progress=False)  # several chunks and buckets
    ds = open_dataset(dataset)
    pooled, first = ds.text_cache(encoder.name)
    texts = ds.texts()
    for row in (0, 17, len(texts) - 1):
        p, f = encoder.featurize([texts[row]])
        np.testing.assert_allclose(pooled[row], p[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(first[row], f[0], rtol=1e-5, atol=1e-6)
    assert ds.meta.text_caches[encoder.name].fingerprint == encoder.fingerprint()
    assert not (dataset / "text_cache" / f".{encoder.name}.partial").exists()


class _Counting:
    """Wraps a featurizer; counts chunk calls and can fail on one, as a killed build would."""

    def __init__(self, inner, fail_on: int | None = None):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.name, self.dim, self.query_prefix = inner.name, inner.dim, inner.query_prefix

    def fingerprint(self):
        return self.inner.fingerprint()

    def featurize(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed")
        return self.inner.featurize(texts)


def test_interrupted_cache_build_resumes(tmp_path, dataset):
    encoder = load_encoder(_tiny_checkpoint(tmp_path / "ckpt"))
    num_chunks = -(-open_dataset(dataset).meta.num_texts // 40)
    with pytest.raises(KeyboardInterrupt):
        build_text_cache(dataset, _Counting(encoder, fail_on=3), chunk_size=40, progress=False)
    assert encoder.name not in open_dataset(dataset).meta.text_caches  # nothing half-written is visible
    resumed = _Counting(encoder)
    build_text_cache(dataset, resumed, chunk_size=40, progress=False)
    assert resumed.calls == num_chunks - 2  # the two finished chunks were kept
    fresh = tmp_path / "fresh"
    shutil.copytree(dataset, fresh)
    shutil.rmtree(fresh / "text_cache")
    meta = json.loads((fresh / "meta.json").read_text())
    meta["text_caches"] = {}
    (fresh / "meta.json").write_text(json.dumps(meta))
    build_text_cache(fresh, encoder, chunk_size=40, progress=False)
    np.testing.assert_array_equal(
        open_dataset(dataset).text_cache(encoder.name)[0], open_dataset(fresh).text_cache(encoder.name)[0]
    )


def test_encode_text_cli_and_training_refuses_other_encoders(tmp_path, dataset, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "tiny-bert")
    encode_text.main(["--data", str(dataset), "--encoder", str(ckpt), "--chunk-size", "64"])
    assert "texts/s" in capsys.readouterr().out
    info = open_dataset(dataset).meta.text_caches["tiny-bert"]
    assert info.fingerprint == text_identity(str(ckpt))[1] and info.dim == 32
    cfg = config(TINY, data={"path": str(dataset), "text_encoder": str(ckpt)})
    assert load_dataset(cfg.data).meta.text_caches["tiny-bert"].dim == 32
    retrained = _tiny_checkpoint(tmp_path / "other" / "tiny-bert", seed=1)  # same name, other weights
    with pytest.raises(DatasetError, match="rebuild the cache"):
        load_dataset(config(TINY, data={"path": str(dataset), "text_encoder": str(retrained)}).data)
    with pytest.raises(DatasetError, match="no text cache made by encoder 'all-MiniLM-L6-v2'"):
        load_dataset(config(TINY, data={"path": str(dataset), "text_encoder": "all-MiniLM-L6-v2"}).data)


def test_hf_to_orbax_round_trip_and_inspect(tmp_path, capsys):
    src = _tiny_checkpoint(tmp_path / "tiny-bert")
    dst = tmp_path / "orbax"
    convert.main(["hf-to-orbax", "--src", str(src), "--dst", str(dst)])
    original, converted = load_encoder(src), load_encoder(dst)
    np.testing.assert_array_equal(original.encode(TEXTS), converted.encode(TEXTS))
    assert converted.fingerprint() == original.fingerprint()  # its caches stay valid
    hf_to_orbax(src, dst)  # its own earlier output: replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("a user's")
    with pytest.raises(FileExistsError, match="--overwrite"):  # a folder it did not write: refused, kept
        hf_to_orbax(src, other)
    assert (other / "notes.txt").read_text() == "a user's"
    capsys.readouterr()
    convert.main(["inspect", str(dst)])
    out = capsys.readouterr().out
    assert "| layers/1/intermediate/kernel | (32, 64) | float32 | encoder" in out
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"parameter layers/0/intermediate/bias has shape \(64,\) in the checkpoint"):
        load_encoder(dst)


def test_inspect_a_training_run(tmp_path, capsys):
    run = trainer.build_run(config(TINY), tmp_path)
    loop.train(run, restore.initial_state(run.spec), until=2)
    run.checkpointer.save(2, restore.initial_state(run.spec), loop.position(run, 2), force=True)
    run.checkpointer.wait()
    convert.main(["inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| params/l0/id_tables/item | (128, 32) | float32 | L0 |" in out
    assert re.search(r"\| opt_state/\S+/mu/l2/gate/kernel \| \(8, 96, 4\) \| float32 \| optimizer state of L2 \|", out)
    assert "| L1 |" in out
