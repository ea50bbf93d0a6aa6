"""Backbones that personalise a shared network by scaling it or generating its weights:

    epnet  PEPNet's EPNet (Chang et al., KDD 2023): a gate NU on the input, from the domain's embedding and the
           input itself (stop-gradient), scales x_hat element-wise before one shared MLP
    ppnet  PEPNet's PPNet: one gate NU per hidden layer, from the persona (here the fused user and item
           vectors, x_hat's first and last thirds) and the input (stop-gradient), scales that layer's output
    hamur  HAMUR (Li et al., CIKM 2023): a shared MLP with an adapter after each layer, h + U relu(D h), whose D
           and U a shared hyper-network makes from the domain's embedding and the example (stop-gradient)
    adasparse  AdaSparse (Yang et al., CIKM 2022): a shared MLP whose every hidden layer's neurons are weighted by
           a domain-aware pruner, pi = beta x sigmoid(alpha x pruner([h; e_domain])), pi <= epsilon set to 0 (the
           pruned neurons); alpha grows by `adasparse_alpha_step` each train step (the schedule that hardens the
           weights towards 0 / beta), and a sparsity regularizer pulls each layer's soft share of pruned neurons
           towards `adasparse_sparsity` (the Fusion form of the paper)
    m2m    M2M (Zhang et al., CIKM 2022): shared experts, then meta units, layers whose kernels and biases are
           generated from the scenario's representation (its embedding): a meta attention scores each expert
           (softmax over experts), and a meta tower of residual meta layers maps their mix

A gate NU is 2 x sigmoid(MLP(...)) with its last layer zero at the start, so every gate starts at exactly 1 and
the network starts as the plain shared MLP; a hyper-network's last layer starts small, so each adapter starts
near the identity. Called as the other backbones: backbone(x_hat, domain, dtype, train) -> (experts [B, 1, h],
L2's gate input [B, 3d]); their parameters are L1 (the domain embeddings too: per-domain rows, fresh for a new
domain in fine-tuning); L2 keeps its towers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sr_jax.config import ModelConfig
from sr_jax.model.layers import Array, StackedDense, StackedMLP, normal, zeros


class GateNU(nnx.Module):
    """PEPNet's gate neural unit: 2 x sigmoid(W2 relu(W1 x + b1) + b2) [B, out], in (0, 2), exactly 1 at the start
    (W2 and b2 start at zero)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = StackedDense(1, d_in, hidden, rngs=rngs)
        self.out_kernel, self.out_bias = zeros((hidden, d_out)), zeros((d_out,))

    def __call__(self, x: Array) -> Array:
        h = jax.nn.relu(self.hidden.all_layers(x.astype(jnp.float32), jnp.float32)[:, 0])
        return 2.0 * jax.nn.sigmoid(h @ self.out_kernel[...] + self.out_bias[...])


def _dense(rngs: nnx.Rngs, dims: tuple[int, ...]) -> nnx.List:
    return nnx.List([StackedDense(1, a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])


def _layer(layer: StackedDense, h: Array, dtype: jnp.dtype) -> Array:
    return jax.nn.relu(layer.all_layers(h, dtype)[:, 0])


class EPNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.domain_embedding = normal(rngs, (num_domains, cfg.gate_dim), cfg.gate_dim**-0.5)
        self.gate = GateNU(cfg.gate_dim + width, width, cfg.gate_hidden, rngs=rngs)
        self.layers = _dense(rngs, (width, *cfg.expert_hidden))

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        e = self.domain_embedding[...][domain]
        h = x_hat * self.gate(jnp.concatenate([e, jax.lax.stop_gradient(x_hat)], axis=1)).astype(x_hat.dtype)
        for layer in self.layers:
            h = _layer(layer, h, dtype)
        return h[:, None], x_hat


class PPNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.dim = cfg.dim
        dims = (width, *cfg.expert_hidden)
        self.layers = _dense(rngs, dims)
        self.gates = nnx.List([GateNU(2 * cfg.dim + width, d, cfg.gate_hidden, rngs=rngs) for d in dims[1:]])

    def persona(self, x_hat: Array) -> Array:
        """The fused user and item vectors [B, 2d] (x_hat is [user | query | item])."""
        return jnp.concatenate([x_hat[:, : self.dim], x_hat[:, -self.dim :]], axis=1)

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        gate_input = jnp.concatenate([self.persona(x_hat), jax.lax.stop_gradient(x_hat)], axis=1)
        h = x_hat
        for layer, gate in zip(self.layers, self.gates):
            h = _layer(layer, h, dtype) * gate(gate_input).astype(dtype)
        return h[:, None], x_hat


class HAMUR(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        self.rank = cfg.adapter_rank
        dims = (width, *cfg.expert_hidden)
        self.domain_embedding = normal(rngs, (num_domains, cfg.gate_dim), cfg.gate_dim**-0.5)
        self.layers = _dense(rngs, dims)
        hyper_in = cfg.gate_dim + width
        self.hyper = StackedDense(1, hyper_in, cfg.gate_hidden, rngs=rngs)
        # one output block per layer: that layer's D [h, r] and U [r, h], flattened
        self.hyper_out = nnx.List(
            [normal(rngs, (cfg.gate_hidden, 2 * d * self.rank), 0.01 * cfg.gate_hidden**-0.5) for d in dims[1:]]
        )

    def adapters(self, x_hat: Array, domain: Array) -> list[tuple[Array, Array]]:
        """Each layer's adapter weights for each example: (D [B, h, r], U [B, r, h]), made by the hyper-network
        from the domain's embedding and the example."""
        e = self.domain_embedding[...][domain]
        z = jax.nn.relu(self.hyper.all_layers(jnp.concatenate([e, jax.lax.stop_gradient(x_hat)], axis=1), jnp.float32))
        out = []
        for block in self.hyper_out:
            flat = z[:, 0] @ block[...]
            d = flat.shape[1] // (2 * self.rank)
            down, up = jnp.split(flat, 2, axis=1)
            out.append((down.reshape(-1, d, self.rank), up.reshape(-1, self.rank, d)))
        return out

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        h = x_hat
        for layer, (down, up) in zip(self.layers, self.adapters(x_hat, domain)):
            h = _layer(layer, h, dtype)
            r = jax.nn.relu(jnp.einsum("bh,bhr->br", h, down.astype(dtype)))
            h = h + jnp.einsum("br,brh->bh", r, up.astype(dtype))
        return h[:, None], x_hat


class MetaUnit(nnx.Module):
    """M2M's meta unit: a dense layer whose kernel [in, out] and bias [out] are generated, per example, from the
    scenario's representation s [B, g] by a linear map (the meta learner)."""

    def __init__(self, g: int, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.d_in, self.d_out = d_in, d_out
        self.kernel_map = normal(rngs, (g, d_in * d_out), (g * d_in) ** -0.5)
        self.bias_map = zeros((g, d_out))

    def weights(self, s: Array) -> tuple[Array, Array]:
        """-> (kernels [B, in, out], biases [B, out])"""
        return (s @ self.kernel_map[...]).reshape(-1, self.d_in, self.d_out), s @ self.bias_map[...]

    def __call__(self, h: Array, s: Array) -> Array:
        """h [B, in] or [B, E, in] -> [B, out] or [B, E, out]"""
        kernel, bias = self.weights(s)
        if h.ndim == 2:
            return jnp.einsum("bi,bio->bo", h, kernel) + bias
        return jnp.einsum("bei,bio->beo", h, kernel) + bias[:, None]


class M2M(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        h, g = cfg.expert_hidden[-1], cfg.gate_dim
        self.domain_embedding = normal(rngs, (num_domains, g), g**-0.5)
        self.experts = StackedMLP(cfg.num_experts, width, cfg.expert_hidden, rngs=rngs)
        self.attention = MetaUnit(g, h, h, rngs=rngs)
        self.score = normal(rngs, (h,), h**-0.5)
        self.tower = nnx.List([MetaUnit(g, h, h, rngs=rngs) for _ in range(cfg.meta_layers)])

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        s = self.domain_embedding[...][domain]
        experts = self.experts.all_layers(x_hat, dtype).astype(jnp.float32)  # [B, E, h]
        scores = jnp.einsum("beh,h->be", jnp.tanh(self.attention(experts, s)), self.score[...])
        mixed = jnp.einsum("be,beh->bh", jax.nn.softmax(scores, axis=-1), experts)
        for unit in self.tower:  # residual meta layers
            mixed = jax.nn.relu(unit(mixed, s)) + mixed
        return mixed[:, None].astype(dtype), x_hat


class AdaSparse(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_domains: int, width: int, *, rngs: nnx.Rngs):
        dims = (width, *cfg.expert_hidden)
        self.domain_embedding = normal(rngs, (num_domains, cfg.gate_dim), cfg.gate_dim**-0.5)
        self.layers = _dense(rngs, dims)
        self.pruners = nnx.List([StackedDense(1, a + cfg.gate_dim, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.alpha = nnx.BatchStat(jnp.ones((), jnp.float32))  # follows training (train steps), not the optimizer
        self.alpha_step, self.beta, self.epsilon = cfg.adasparse_alpha_step, 2.0, 1e-2
        self.target, self.weight = cfg.adasparse_sparsity, cfg.adasparse_weight

    def weights(self, h: Array, e: Array, pruner: StackedDense) -> tuple[Array, Array]:
        """-> (the neurons' weighting factors pi [B, out], their soft share of pruned neurons [])"""
        soft = jax.nn.sigmoid(self.alpha[...] * pruner.all_layers(jnp.concatenate([h, e], axis=1), jnp.float32)[:, 0])
        pi = self.beta * soft
        return jnp.where(pi > self.epsilon, pi, 0.0), 1.0 - soft.mean()

    def __call__(self, x_hat: Array, domain: Array, dtype: jnp.dtype, train: bool) -> tuple[Array, Array]:
        e = self.domain_embedding[...][domain]
        h, penalty = x_hat, jnp.zeros((), jnp.float32)
        for layer, pruner in zip(self.layers, self.pruners):
            pi, pruned = self.weights(h.astype(jnp.float32), e, pruner)
            h = _layer(layer, h, dtype) * pi.astype(dtype)
            penalty = penalty + jnp.abs(pruned - self.target)
        if train:
            self.alpha[...] = self.alpha[...] + self.alpha_step
            self.sow(nnx.Intermediate, "backbone_reg", self.weight * penalty)
        return h[:, None], x_hat
