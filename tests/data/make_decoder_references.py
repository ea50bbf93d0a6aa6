"""Makes `tiny_decoders/FAMILY/` (random decoder checkpoints in Hugging Face layout, written by transformers
itself) and `decoder_reference.npz` (transformers' PyTorch outputs on them), for the decoder parity tests.

Run once, in an environment with torch and transformers (not dependencies of sr-jax):
    python tests/data/make_decoder_references.py tests/data

Every family gets odd head counts and grouped-query attention, and the settings that make it differ: biases,
rotary scaling (llama3, linear, yarn, with a short original length so the scaling acts on these positions),
partial interleaved rotary (GLM), a sliding window shorter than the texts (Mistral, Qwen2), q/k norms
(Qwen3), post norms (GLM-4), Gemma's norm offset and embedding scale. Weights are drawn larger than
transformers' init (std 0.02 leaves attention nearly uniform, which would hide mistakes) and rounded to
bf16, so the checkpoint is stored in bf16 (half the bytes, and it exercises that reader) while the reference
is computed in float32 from exactly those values. The llama checkpoint is saved in shards with an index.

The texts are tokenized by transformers' tokenizer (the ids are part of the reference: one text runs past
MAX_LENGTH and is truncated), right-padded. The reference holds the last hidden states and both poolings;
the script also checks that left padding with positions counted over real tokens gives the same states.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

MAX_LENGTH = 24
TEXTS = [
    "cheap espresso grinder",
    "Toy Story (1995). Adventure, Animation, Children, Comedy",
    "a",
    "premium kettlebell for home gym workouts with a long description of its grip, coating and weight range",
    "studio grade zoom lens for mirrorless cameras",
    "mystery thriller paperback",
]
CORPUS = TEXTS * 4 + ["the quick brown fox jumps over the lazy dog", "retrieve relevant products for a query"]
COMMON = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "max_position_embeddings": 64}
FAMILIES = {
    "llama": {"num_attention_heads": 6, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}},
    "mistral": {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 8,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "qwen2": {"num_attention_heads": 6, "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 6,
              "max_window_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 16}},
    "qwen3": {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 32},
    "glm": {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16},
    "glm4": {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 8},
    "gemma": {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 16},
}  # fmt: skip
CAUSAL_LM = ("llama", "glm", "gemma")  # saved with the LM head (keys under model.), the others as base models
LEFT_PADDED = ("qwen3", "mistral")  # tokenizer_config.json says padding_side=left


def tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=special, initial_alphabet=alphabet)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out))
    return PreTrainedTokenizerFast(tokenizer_file=str(out), bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def randomize(model: torch.nn.Module, family: str) -> None:
    generator = torch.Generator().manual_seed(sorted(FAMILIES).index(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:  # Gemma scales by 1 + weight
                p.copy_(0.1 * noise + (0.0 if family == "gemma" else 1.0))
            else:
                p.copy_(0.15 * noise)
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def reference(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        base = model.model if hasattr(model, "lm_head") else model
        out = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    return out.numpy()


def main(out: str) -> None:
    out = Path(out)
    folder = out / "tiny_decoders"
    folder.mkdir(exist_ok=True)
    tok = tokenizer(folder / "tokenizer.json")
    vocab = tok.vocab_size
    arrays = {}
    for family, extra in FAMILIES.items():
        config = AutoConfig.for_model(family, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      attn_implementation="eager", **COMMON, **extra)  # fmt: skip
        cls = AutoModelForCausalLM if family in CAUSAL_LM else AutoModel
        model = cls.from_config(config).eval()
        randomize(model, family)
        eos = family == "qwen3"  # as Qwen3-Embedding: EOS appended, the text truncated to make room for it
        encoded = [tok(t, truncation=True, max_length=MAX_LENGTH - eos)["input_ids"] for t in TEXTS]
        encoded = [x + [2] if eos else x for x in encoded]
        assert max(len(x) for x in encoded) == MAX_LENGTH, "one text must be truncated at the maximum length"
        ids = np.zeros((len(TEXTS), MAX_LENGTH), np.int64)
        mask = np.zeros_like(ids)
        for r, x in enumerate(encoded):
            ids[r, : len(x)], mask[r, : len(x)] = x, 1
        hidden = reference(model, ids, mask)
        left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
        for r, x in enumerate(encoded):
            left_ids[r, MAX_LENGTH - len(x) :], left_mask[r, MAX_LENGTH - len(x) :] = x, 1
        with torch.no_grad():  # left padding, positions over real tokens (what generate() passes)
            positions = torch.tensor(np.maximum(left_mask.cumsum(1) - 1, 0))
            base = model.model if hasattr(model, "lm_head") else model
            left = base(input_ids=torch.tensor(left_ids), attention_mask=torch.tensor(left_mask),
                        position_ids=positions).last_hidden_state.numpy()  # fmt: skip
        for r, x in enumerate(encoded):
            np.testing.assert_allclose(left[r, MAX_LENGTH - len(x) :], hidden[r, : len(x)], rtol=1e-4, atol=1e-4)
        lengths = mask.sum(1)
        arrays[f"{family}/ids"] = ids.astype(np.int32)
        arrays[f"{family}/mask"] = mask.astype(np.int8)
        arrays[f"{family}/hidden"] = hidden.astype(np.float32)
        arrays[f"{family}/last"] = hidden[np.arange(len(TEXTS)), lengths - 1]
        arrays[f"{family}/mean"] = (hidden * mask[..., None]).sum(1) / lengths[:, None]
        target = folder / family
        shard = {"max_shard_size": "100KB"} if family == "llama" else {}
        model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True, **shard)
        (target / "generation_config.json").unlink(missing_ok=True)
        (target / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        side = "left" if family in LEFT_PADDED else "right"
        (target / "tokenizer_config.json").write_text(json.dumps({"padding_side": side}) + "\n")
    (folder / "tokenizer.json").unlink()
    arrays["texts"] = np.array(TEXTS)
    np.savez_compressed(out / "decoder_reference.npz", **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
