"""The same network in PyTorch, as the benchmark's reference (run only where torch is importable; torch
is never a dependency of sr-jax).

`TorchSRModel(params, cfg, meta, text)` takes the JAX model's parameters (numpy, `sr_jax.model.init`'s tree),
names them by the public scheme of `sr_jax.export.interop.torch_state_dict` (so its `state_dict()` is what
`python -m train.convert to-torch` writes, and `load_state_dict` takes it back), and computes the same logits
and loss: L0 lookups and projections, domain aspect gating, the Domain Adaptive Layer, the JS regularizer,
MMoE experts, per-domain gates and towers, the content match. Per-domain layers are computed for every domain and
gathered. Supported: the default model without history (gating mean|domain, regularizer js|none, backbone mmoe);
anything else is refused.

`train_step(model, update, ...)` is the training a PyTorch user would write for it, with the table update
they would pick (`UPDATES`):

    dense           torch.optim.Adam over every parameter (every table row, every step)
    sparse_adam     the tables' lookups give sparse gradients (`F.embedding(sparse=True)`, as
                    `nn.Embedding(sparse=True)`) updated by `torch.optim.SparseAdam` (lazy Adam: sr-jax's
                    `lazy_adam`); Adam for the rest
    sparse_adagrad  sparse gradients updated by `torch.optim.Adagrad`, torch's only other optimizer that takes
                    them. It is element-wise Adagrad: torch has no row-wise Adagrad (sr-jax's
                    `rowwise_adagrad` is FBGEMM/TorchRec's, outside torch), so this is the closest torch-native
                    rule; it keeps a [rows, d] accumulator where row-wise keeps [rows]

Global-norm clipping covers sparse gradients too (torch's `clip_grad_norm_` refuses them). bf16 runs under
`torch.autocast`; `compile=True` compiles the network with `torch.compile` (with sparse gradients, the part
after the lookups: the lookups' sparse backward does not trace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sr_jax.config import ModelConfig
from sr_jax.data.schema import DatasetMeta
from sr_jax.export.interop import torch_state_dict
from sr_jax.model.encoding import SIDES
from sr_jax.model.match import MATCH_SCALE
from sr_jax.model.rows import layout as rows_layout, position as row_position


def _param(x: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.array(x, np.float32)))


UPDATES = ("dense", "sparse_adam", "sparse_adagrad")
ADAGRAD_EPS = 1e-8  # sr-jax's (torch's default is 1e-10)


class TorchSRModel(nn.Module):
    """`sparse`: the tables' lookups give sparse gradients."""

    def __init__(
        self, params: dict[str, Any], cfg: ModelConfig, meta: DatasetMeta, text: np.ndarray, sparse: bool = False
    ):
        super().__init__()
        if cfg.gating not in ("mean", "domain") or cfg.regularizer not in ("js", "none") or cfg.backbone != "mmoe":
            raise NotImplementedError("the torch reference covers gating mean|domain, regularizer js|none, mmoe")
        if cfg.id_buckets or not cfg.use_domain_adapter or not cfg.use_text or cfg.user_history > 0:
            raise NotImplementedError("the torch reference covers the full model without id hashing or history")
        self.cfg, self.meta, self.sparse = cfg, meta, sparse
        state = torch_state_dict(params)  # the public name scheme (sr_jax.export.interop)

        def group(prefix: str) -> dict[str, nn.Parameter]:
            return {n[len(prefix) + 1 :]: _param(v) for n, v in state.items() if n.startswith(prefix + ".")}

        def listed(prefix: str) -> list[nn.Parameter]:
            return [_param(state[f"{prefix}.{i}"]) for i in range(len(group(prefix)))]

        self.id_tables = nn.ParameterDict(group("id_tables"))
        self.fields = {s: [f for f in meta.sparse_fields if f.side == s] for s in ("user", "item")}
        if any(f.max_len > 1 for f in meta.sparse_fields):
            raise NotImplementedError("the torch reference covers single-valued sparse fields")
        self.sparse_tables = nn.ParameterDict(group("sparse_tables"))
        self.sparse_proj = nn.ParameterDict(group("sparse_proj"))
        self.dense_fields = {s: [f for f in meta.dense_fields if f.side == s] for s in ("user", "item")}
        self.dense = nn.ParameterDict(group("dense"))  # per field [2, d]: w_f, b_f
        self.text_proj = nn.ParameterDict(group("text_proj"))
        self.register_buffer("text", torch.from_numpy(np.asarray(text, np.float32)), persistent=False)  # data
        self.domain_embedding = _param(state["domain_embedding"])
        self.missing = nn.ParameterDict(group("missing"))
        self.aspect_embedding = nn.ParameterDict(group("aspect_embedding"))
        self.dal_kernel, self.dal_bias = _param(state["dal_kernel"]), _param(state["dal_bias"])
        self.norm_scale, self.norm_bias = _param(state["norm_scale"]), _param(state["norm_bias"])
        self.experts = nn.ParameterList(listed("experts"))  # (bias, kernel) of each layer
        self.gate_kernel, self.gate_bias = _param(state["gate_kernel"]), _param(state["gate_bias"])
        self.tower = nn.ParameterList(listed("tower"))
        self.match_weight = _param(state["match_weight"]) if "match_weight" in state else None  # content match

    def tables(self) -> list[nn.Parameter]:
        """The embedding tables (sr-jax's row-sharded, row-sparse updated parameters)."""
        return [*self.id_tables.values(), *self.sparse_tables.values()]

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tables' rows each example reads, {table name: [B, d]}: the only part with sparse gradients."""
        layout = rows_layout(self.cfg)

        def read(ids: torch.Tensor, table: nn.Parameter) -> torch.Tensor:  # as the JAX model stores its rows
            return F.embedding(row_position(ids, table.shape[0], *layout), table, sparse=self.sparse)

        rows = {f"{side}_id": read(batch[f"{side}_id"], t) for side, t in self.id_tables.items()}
        for side, fields in self.fields.items():
            for f in fields:
                rows[f"{side}_{f.name}"] = read(batch[f.column], self.sparse_tables[f"{side}_{f.name}"])
        return rows

    def _side(
        self, side: str, batch: dict[str, torch.Tensor], rows: dict[str, torch.Tensor], e_d: torch.Tensor
    ) -> torch.Tensor:
        ids = batch[f"{side}_id"]
        vectors, masks = [rows[f"{side}_id"]], [ids != 0]
        if side != "user":
            row = batch[f"{side}_text"]
            has = row >= 0
            pooled = torch.where(has[:, None], self.text[row.clamp(min=0)], 0.0)
            vectors.append(pooled @ self.text_proj[f"{side}_kernel"] + self.text_proj[f"{side}_bias"])
            masks.append(has)
        if side != "query" and self.fields[side]:
            values = [batch[f.column] for f in self.fields[side]]
            projected = torch.stack(  # each field through its projection, then the mean over present fields
                [
                    rows[f"{side}_{f.name}"] @ self.sparse_proj[f"{side}_{f.name}_kernel"]
                    + self.sparse_proj[f"{side}_{f.name}_bias"]
                    for f in self.fields[side]
                ],
                1,
            )
            present = torch.stack([v != 0 for v in values], 1).float()
            vectors.append(torch.einsum("bf,bfd->bd", present, projected) / present.sum(1, keepdim=True).clamp(min=1))
            masks.append(present.sum(1) > 0)
        if side != "query" and self.dense_fields[side]:
            xs = [batch[f.column].float() for f in self.dense_fields[side]]
            wb = [self.dense[f"{side}_{f.name}"] for f in self.dense_fields[side]]
            each = torch.stack([torch.nan_to_num(x, 0.0)[:, None] * p[0] + p[1] for x, p in zip(xs, wb)], 1)
            present = torch.stack([~torch.isnan(x) for x in xs], 1).float()
            vectors.append(torch.einsum("bf,bfd->bd", present, each) / present.sum(1, keepdim=True).clamp(min=1))
            masks.append(present.sum(1) > 0)
        vectors, mask = torch.stack(vectors, 1), torch.stack(masks, 1)  # [B, A, d], [B, A]
        if self.cfg.gating == "mean":
            logits = torch.zeros(mask.shape, device=mask.device)
        else:
            logits = e_d @ self.aspect_embedding[side].T
        logits = torch.where(mask, logits, -torch.inf)
        any_present = mask.any(-1, keepdim=True)
        w = torch.where(mask, torch.softmax(torch.where(any_present, logits, 0.0), -1), 0.0)
        h = torch.einsum("ba,bad->bd", w, vectors)
        return torch.where(any_present, h, self.missing[side])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits [B], regularizer)"""
        return self.network(batch, self.embed(batch))

    def network(
        self, batch: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after the lookups (`embed`): -> (logits [B], regularizer)."""
        domain = batch["domain"]
        e_d = self.domain_embedding[domain]
        x = torch.cat([self._side(s, batch, rows, e_d) for s in SIDES], 1)  # [B, 3d]
        every = torch.einsum("bi,kio->bko", x, self.dal_kernel) + self.dal_bias
        z = F.layer_norm(_pick(every, domain), x.shape[1:], eps=1e-6)  # standardised: what L_reg aligns
        x_hat = z * self.norm_scale + self.norm_bias
        reg = _js(z, domain, self.meta.num_domains, self.cfg.reg_temperature)
        h = x_hat
        for i in range(0, len(self.experts), 2):
            spec = "bi,eio->beo" if h.dim() == 2 else "bei,eio->beo"
            h = torch.relu(torch.einsum(spec, h, self.experts[i + 1]) + self.experts[i])  # (bias, kernel) pairs
        g = torch.softmax(_pick(torch.einsum("bi,kie->bke", x_hat, self.gate_kernel) + self.gate_bias, domain), -1)
        t = torch.einsum("be,beh->bh", g, h)
        n = len(self.tower) // 2
        for i in range(n):
            every = torch.einsum("bi,kio->bko", t, self.tower[2 * i + 1]) + self.tower[2 * i]
            t = _pick(every, domain)
            if i < n - 1:
                t = torch.relu(t)
        if self.cfg.regularizer == "none":
            reg = torch.zeros((), device=x.device)
        logits = t[:, 0]
        if self.match_weight is not None:  # w_k . [cos(query, item), cos(history, item)]; no history here
            query, item = (self._unit_text(batch[f"{s}_text"]) for s in ("query", "item"))
            logits = logits + self.match_weight[domain][:, 0] * (query * item).sum(-1) * MATCH_SCALE
        return logits, reg

    def _unit_text(self, row: torch.Tensor) -> torch.Tensor:
        pooled = self.text[row.clamp(min=0)]
        norm = pooled.pow(2).sum(-1, keepdim=True).clamp(min=1e-12).sqrt()
        return torch.where((row >= 0)[:, None], pooled / norm, 0.0)

    def loss(self, batch: dict[str, torch.Tensor], rows: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        logits, reg = self.network(batch, self.embed(batch) if rows is None else rows)
        return F.binary_cross_entropy_with_logits(logits, batch["label"].float()) + self.cfg.reg_weight * reg


def _pick(every: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, K, out] -> [B, out]: row index[b] of example b."""
    return every.gather(1, index[:, None, None].expand(-1, 1, every.shape[-1]))[:, 0]


def _js(z: torch.Tensor, domain: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Mean over present domain pairs of JS(p_i || p_j) / log 2, in log space (as the JAX model)."""
    onehot = F.one_hot(domain, k).float()
    counts = onehot.sum(0)
    log_probs = torch.log_softmax(z / temperature, -1)
    peak = torch.full((k, z.shape[1]), -torch.inf, device=z.device).index_reduce(0, domain, log_probs, "amax")
    peak = torch.where(counts[:, None] > 0, peak, 0.0).detach()
    sums = onehot.T @ torch.exp(log_probs - peak[domain])
    log_p = peak + torch.log(sums.clamp(min=1e-30)) - torch.log(counts.clamp(min=1.0))[:, None]
    log_p = torch.where(counts[:, None] > 0, log_p, -float(np.log(z.shape[1])))
    lp_i, lp_j = log_p[:, None, :], log_p[None, :, :]
    log_m = torch.logaddexp(lp_i, lp_j) - np.log(2.0)
    js = 0.5 * ((lp_i.exp() * (lp_i - log_m)).sum(-1) + (lp_j.exp() * (lp_j - log_m)).sum(-1)) / np.log(2.0)
    present = counts > 0
    pairs = present[:, None] & present[None, :] & torch.triu(torch.ones(k, k, dtype=torch.bool, device=z.device), 1)
    return torch.where(pairs, js, 0.0).sum() / pairs.sum().clamp(min=1)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """optax.clip_by_global_norm for dense and sparse gradients: g * max_norm / max(norm, max_norm)."""
    grads = []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # repeated rows summed, so the norm counts each row once
            grads.append(p.grad._values())
        elif p.grad is not None:
            grads.append(p.grad)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = max_norm / torch.clamp(norm, min=max_norm)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm


def train_step(
    model: TorchSRModel,
    update: str,
    learning_rate: float,
    grad_clip: float,
    autocast: torch.dtype | None = None,
    compile: bool = False,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """step(batch) -> loss: forward, backward, clipping and the `update`'s optimizers (module docstring)."""
    if update not in UPDATES:
        raise ValueError(f"torch update {update!r}: expected one of {UPDATES}")
    if model.sparse != (update != "dense"):
        raise ValueError(f"torch update {update!r} needs TorchSRModel(sparse={update != 'dense'})")
    fused = next(model.parameters()).is_cuda  # torch's fastest Adam where it has one
    if update == "dense":
        optimizers = [torch.optim.Adam(model.parameters(), learning_rate, fused=fused)]
    else:
        tables = {id(t) for t in model.tables()}
        rest = [p for p in model.parameters() if id(p) not in tables]
        table_opt = (
            torch.optim.SparseAdam(model.tables(), learning_rate)
            if update == "sparse_adam"
            else torch.optim.Adagrad(model.tables(), learning_rate, eps=ADAGRAD_EPS)
        )
        optimizers = [table_opt, torch.optim.Adam(rest, learning_rate, fused=fused)]
    params = list(model.parameters())
    device_type = next(model.parameters()).device.type

    def loss_of(batch, rows):
        with torch.autocast(device_type, autocast, enabled=autocast is not None):
            return model.loss(batch, rows)

    if compile:
        loss_of = torch.compile(loss_of)

    def step(batch):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_of(batch, model.embed(batch))
        loss.backward()
        if grad_clip > 0:
            clip_grad_norm(params, grad_clip)
        for opt in optimizers:
            opt.step()
        return loss

    return step
