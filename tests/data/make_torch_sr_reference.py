"""Makes `torch_sr_reference.npz`: the PyTorch reference module (sr_jax/bench/torch_reference.py) loaded from
`train.convert to-torch`'s state_dict, and its logits, for the interop test that runs without torch.

Run once, in an environment with torch beside sr-jax's own (torch is not a dependency of sr-jax):
    PYTHONPATH=.:.venv/lib/python3.11/site-packages TORCH_VENV/bin/python tests/data/make_torch_sr_reference.py \
        tests/data/torch_sr_reference.npz
It saves the state_dict of a small random model (the bench model, narrower: 3 domains, sparse fields), the
module's own state_dict keys (to catch a renamed parameter), a batch and the module's logits and regularizer.
"""

import dataclasses
import json
import sys

import jax
import numpy as np
import torch

from sr_jax import model as sr_model
from sr_jax.bench.torch_reference import TorchSRModel
from sr_jax.bench.world import bench_meta, random_columns
from sr_jax.config import to_dict
from sr_jax.export.interop import torch_state_dict
from train.cli import config_from_name


def main(out: str) -> None:
    meta = bench_meta(fields=4, vocab=30, domains=3, num_texts=20)
    cfg = dataclasses.replace(
        config_from_name("bench").model, dim=16, num_experts=3, expert_hidden=(24, 12), tower_hidden=(8,)
    )
    text = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    _, params = sr_model.init(cfg, meta, 16, seed=5)
    state = torch_state_dict(jax.tree.map(np.asarray, params))
    module = TorchSRModel(jax.tree.map(np.asarray, params), cfg, meta, text)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    cols = random_columns(meta, 64, seed=2)
    cols["query_text"][::4] = -1
    logits, reg = module({k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in cols.items()})
    np.savez_compressed(
        out,
        **{f"state/{k}": v for k, v in state.items()},
        **{f"batch/{k}": np.asarray(v) for k, v in cols.items()},
        text=text,
        logits=logits.detach().numpy(),
        reg=np.float32(reg.detach()),
        module_keys=np.array(sorted(module.state_dict())),
        model_config=np.array(json.dumps(to_dict(cfg))),
        meta=np.array(json.dumps({"fields": 4, "vocab": 30, "domains": 3, "num_texts": 20})),
        torch_version=np.array(torch.__version__),
    )


if __name__ == "__main__":
    main(sys.argv[1])
