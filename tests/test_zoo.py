"""The field's other multi-domain backbones (`sr_jax/model/backbones/`, one module per paper): each one's defining
behaviour, not only its shapes. EPNet and PPNet gates scale by 2 x sigmoid and start at exactly 1 (the network
starts as the plain shared MLP); HAMUR's adapter weights are a function of the hyper-network's input (the domain
and the example); M2M's weights are generated from the domain's embedding; M3oE fuses a shared and a domain
mixture by the domain's weights; AdaSparse prunes by domain under its regularizer; AdaptDHM routes by the
nearest centroid; SAR-Net transfers by domain and adds a debias expert."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, config, model_inputs
from sr_jax import model as sr_model
from sr_jax.model.backbones import BackboneInput
from sr_jax.model.backbones.hamur import HAMUR
from sr_jax.model.backbones.pepnet import EPNet, GateNU, PPNet


@pytest.fixture(scope="module")
def data():
    return model_inputs()


def _cfg(**fields):
    return dataclasses.replace(config(TINY).model, **fields)


TABLE = jax.random.normal(jax.random.key(11), (3, _cfg().gate_dim))  # L1's domain embedding, as a backbone reads it


def _run(net, x, domain, train: bool, table=TABLE):
    """A backbone on inputs x (as x_hat and as the sides before the DAL) -> (experts, gate input)."""
    return net(BackboneInput(x, x, domain, table[domain]), jnp.float32, train)


def _plain_mlp(layers, x):
    for layer in layers:
        x = jax.nn.relu(x @ layer.kernel[...] + layer.bias[...])
    return x


def test_a_gate_nu_scales_by_two_sigmoid_and_starts_at_one():
    gate = GateNU(5, 3, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 5))
    np.testing.assert_array_equal(np.asarray(gate(x)), 1.0)
    gate.out_bias[...] = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(np.asarray(gate(x))[0], 2 * jax.nn.sigmoid(jnp.array([-2.0, 0.0, 3.0])), rtol=1e-6)
    gate.out_kernel[...] = jnp.full((8, 3), 50.0)
    assert float(gate(x).max()) <= 2.0 and float(gate(x).min()) >= 0.0


@pytest.mark.parametrize("kind", [EPNet, PPNet])
def test_epnet_and_ppnet_start_as_the_shared_mlp_then_scale_by_their_gates(kind):
    cfg = _cfg(backbone=kind.__name__.lower(), dim=4)
    net = kind(cfg, 3, 12, rngs=nnx.Rngs(0))
    x, domain = jax.random.normal(jax.random.key(2), (10, 12)), jnp.arange(10) % 3
    experts, gate_input = _run(net, x, domain, False)
    assert experts.shape == (10, 1, cfg.expert_hidden[-1]) and gate_input is None  # L2 reads x_hat
    np.testing.assert_allclose(np.asarray(experts[:, 0]), np.asarray(_plain_mlp(net.mlp.layers, x)), rtol=1e-6)
    if kind is EPNet:  # the input scaled by the domain's gate: another domain, another scale
        net.gate.out_kernel[...] = jax.random.normal(jax.random.key(3), net.gate.out_kernel.shape)
        scaled = _run(net, x, domain, False).experts
        other = _run(net, x, (domain + 1) % 3, False).experts
        assert not np.allclose(np.asarray(scaled), np.asarray(other))
    else:  # the first layer's input scaled by 2 sigmoid(b) where its gate's bias is b: PEPNet gates a layer's input
        net.gates[0].out_bias[...] = jnp.full(net.gates[0].out_bias.shape, 1.5)
        first = jax.nn.relu(net.mlp.layers[0](x * 2 * jax.nn.sigmoid(1.5), jnp.float32))
        np.testing.assert_allclose(
            np.asarray(_run(net, x, domain, False).experts[:, 0]),
            np.asarray(_plain_mlp(net.mlp.layers[1:], first)),
            rtol=1e-5,
        )


def test_ppnet_s_persona_is_the_user_and_the_item_before_the_dal():
    """The persona is the fused user and item vectors as the sides gave them: the DAL mixes user, query and item
    into x_hat, so a persona cut out of x_hat would read the query (issue 41: |d persona / d query| 0.72)."""
    cfg = _cfg(backbone="ppnet", dim=4)
    net = PPNet(cfg, 3, 12, rngs=nnx.Rngs(0))
    for gate in net.gates:
        gate.out_kernel[...] = jax.random.normal(jax.random.key(5), gate.out_kernel.shape)
    x, x_hat = jax.random.normal(jax.random.key(6), (2, 10, 12))
    domain = jnp.arange(10) % 3

    def output(sides):
        return net(BackboneInput(x_hat, sides, domain, TABLE[domain]), jnp.float32, False).experts.sum()

    grad = jax.grad(output)(x)
    user, query, item = (np.abs(np.asarray(grad[:, k * 4 : (k + 1) * 4])).max() for k in range(3))
    assert query == 0.0 and user > 1e-4 and item > 1e-4


def test_hamur_adapter_weights_are_made_from_the_domain_and_the_example():
    cfg = _cfg(backbone="hamur", adapter_rank=4)
    net = HAMUR(cfg, 3, 12, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (6, 12))
    same = net.adapters(jnp.concatenate([x[:1]] * 2), TABLE[jnp.array([0, 0])])
    other_domain = net.adapters(x[:1], TABLE[jnp.array([1])])
    other_example = net.adapters(x[1:2], TABLE[jnp.array([0])])
    (down, up), (down_k, _), (down_x, _) = same[0], other_domain[0], other_example[0]
    assert down.shape == (2, cfg.expert_hidden[0], 4) and up.shape == (2, 4, cfg.expert_hidden[0])
    np.testing.assert_array_equal(np.asarray(down[0]), np.asarray(down[1]))  # the same input: the same adapter
    assert not np.allclose(np.asarray(down[0]), np.asarray(down_k[0]))
    assert not np.allclose(np.asarray(down[0]), np.asarray(down_x[0]))
    moved = TABLE.at[0].add(1.0)  # the hyper-network's input moved
    assert not np.allclose(np.asarray(net.adapters(x[:1], moved[jnp.array([0])])[0][0]), np.asarray(down[:1]))
    # the adapters start near the identity: the output is the shared MLP's, up to a small residual
    out = _run(net, x, jnp.zeros(6, jnp.int32), False).experts[:, 0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(_plain_mlp(net.mlp.layers, x)), atol=1e-2)


@pytest.mark.parametrize("backbone", ["epnet", "ppnet", "hamur", "m2m", "m3oe", "adasparse", "sarnet", "adaptdhm"])
def test_each_runs_in_the_model_learns_and_keeps_its_levels(data, backbone):
    ds, text, batch = data
    graphdef, params = sr_model.init(_cfg(backbone=backbone), ds.meta, text.pooled.shape[1], seed=0)
    assert "backbone" in params["l1"] and "tower" in params["l2"]
    levels = sr_model.leaf_levels(params)
    assert set(jax.tree.leaves(levels["l1"]["backbone"])) == {"l1"}  # frozen with L1, like the other backbones

    def loss(p):
        logits, _ = sr_model.apply(graphdef, p, batch, text)
        return jnp.mean(jnp.maximum(logits, 0) - logits * batch["label"] + jnp.log1p(jnp.exp(-jnp.abs(logits))))

    if backbone == "adasparse":  # in training: its sparsity term beside L_reg, and alpha's schedule in the stats
        _, aux = sr_model.apply(graphdef, params, batch, text, train=True)
        assert float(aux["backbone_reg"]) > 0
        assert float(aux["stats"]["l1"]["backbone"]["alpha"]) > float(params["l1"]["backbone"]["alpha"])
    before = float(loss(params))
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)))
    for _ in range(20):
        params = step(params)
    assert float(loss(params)) < before


@pytest.mark.parametrize("backbone", ["ppnet", "adaptdhm", "adasparse"])  # gates; batch statistics (centroids, alpha)
def test_a_zoo_backbone_trains_exports_and_converts(tmp_path, backbone):
    """Through the whole product: a run, the serving artifact (its own loader scores test rows as the run's
    scorer does, batch statistics included), a safetensors round trip of its parameters."""
    import sys

    import chex

    from sr_jax.export import scoring, trained
    from sr_jax.training import trainer
    from train import convert, export

    cfg = config(TINY, model={"backbone": backbone}, train={"epochs": 1})
    trainer.fit(cfg, tmp_path / "run")
    export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "served")])
    sys.path.insert(0, str(tmp_path / "served"))
    try:
        import serve

        served = serve.load(str(tmp_path / "served"))
    finally:
        sys.path.remove(str(tmp_path / "served"))
        sys.modules.pop("serve", None)
    model = trained.load(tmp_path / "run")
    dataset = model.dataset()
    columns = dataset.split("test")
    probability = served({name: np.asarray(columns[name])[:64] for name in served.features})["probability"]
    assert probability.shape == (64,) and np.isfinite(probability).all() and probability.std() > 0
    scorer = scoring.run_scorer(model, 64)
    rows = {k: np.asarray(v)[:64] for k, v in scoring.model_columns(scorer, dataset, "test").items()}
    expected = scorer.bind(scoring.text_table(scorer, dataset))(rows)["probability"]
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-7)
    convert.main(["to-safetensors", str(tmp_path / "run"), str(tmp_path / "p.safetensors")])
    from safetensors.numpy import load_file

    from sr_jax.treeutil import unflatten

    flat = load_file(str(tmp_path / "p.safetensors"))
    assert any(k.startswith("l1.backbone.") for k in flat)
    chex.assert_trees_all_equal(unflatten({k.replace(".", "/"): v for k, v in flat.items()}), model.params)


def test_m2m_weights_are_generated_from_the_domain_embedding():
    """M2M's meta units: kernels and biases are a function of the scenario's embedding, so another domain (or a
    moved embedding) gives other weights and another output; one domain's examples share theirs."""
    from sr_jax.model.backbones.m2m import M2M

    cfg = _cfg(backbone="m2m")
    net = M2M(cfg, 3, 12, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (6, 12))
    s = TABLE[jnp.array([0, 0, 1])]
    kernel, _ = net.attention.weights(s)
    np.testing.assert_array_equal(np.asarray(kernel[0]), np.asarray(kernel[1]))
    assert not np.allclose(np.asarray(kernel[0]), np.asarray(kernel[2]))
    out = _run(net, x, jnp.zeros(6, jnp.int32), False).experts
    assert out.shape == (6, 1, cfg.expert_hidden[-1])
    assert not np.allclose(np.asarray(out), np.asarray(_run(net, x, jnp.ones(6, jnp.int32), False).experts))
    moved = TABLE.at[0].multiply(2.0)
    assert not np.allclose(np.asarray(out), np.asarray(_run(net, x, jnp.zeros(6, jnp.int32), False, moved).experts))


def test_m3oe_fuses_the_shared_and_the_domain_mixture_by_the_domain_s_weights():
    """At the start the two mixtures weigh 1/2 each; moving one domain's fusion weights all onto the shared
    mixture gives exactly the shared experts' gated mix for that domain's examples, and leaves the others."""
    from sr_jax.model.backbones.m3oe import M3oE

    net = M3oE(_cfg(backbone="m3oe"), 3, 12, rngs=nnx.Rngs(0))
    x, domain = jax.random.normal(jax.random.key(6), (9, 12)), jnp.arange(9) % 3
    before = _run(net, x, domain, False).experts[:, 0]
    net.fusion[...] = net.fusion[...].at[1].set(jnp.array([50.0, -50.0]))
    after = _run(net, x, domain, False).experts[:, 0]
    gate = jax.nn.softmax(net.shared_gate.own_layer(x, domain, jnp.float32), -1)
    shared = jnp.einsum("be,beh->bh", gate, net.shared.all_layers(x, jnp.float32))
    ones = np.asarray(domain) == 1
    np.testing.assert_allclose(np.asarray(after)[ones], np.asarray(shared)[ones], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(after)[~ones], np.asarray(before)[~ones])


def test_adasparse_prunes_by_domain_and_its_regularizer_shrinks_the_weights():
    """The pruner's weights differ by domain; a weight at or below epsilon prunes its neuron (exactly 0); a train
    call sharpens alpha by its step and sows the sparsity term; gradient steps on that term alone lower the
    share of kept weight towards a high target."""
    from sr_jax.model.backbones.adasparse import AdaSparse

    cfg = _cfg(backbone="adasparse", adasparse_sparsity=0.9, adasparse_weight=1.0, adasparse_alpha_step=0.5)
    net = AdaSparse(cfg, 3, 12, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (32, 12))
    e = TABLE
    pi_0, _ = net.weights(x, jnp.broadcast_to(e[0], (32, e.shape[1])), net.pruners[0])
    pi_1, _ = net.weights(x, jnp.broadcast_to(e[1], (32, e.shape[1])), net.pruners[0])
    assert not np.allclose(np.asarray(pi_0), np.asarray(pi_1))
    net.pruners[0].bias[...] = net.pruners[0].bias[...].at[:4].set(-20.0)  # 2 sigmoid(-20) < epsilon
    domain = jnp.zeros(32, jnp.int32)
    first = jax.nn.relu(net.mlp.layers[0](x, jnp.float32))
    pi, _ = net.weights(x, e[domain], net.pruners[0])
    assert (np.asarray(pi)[:, :4] == 0).all() and (np.asarray(pi)[:, 4:] > 0).all()
    np.testing.assert_array_equal(np.asarray((first * pi)[:, :4]), 0.0)

    graphdef, state = nnx.split(net)
    params = nnx.to_pure_dict(state)  # as sr_model.apply: a pure tree, the model made inside the trace

    def penalty(params):
        _, sown = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(
            BackboneInput(x, x, domain, TABLE[domain]), jnp.float32, True
        )
        return sum(jax.tree.leaves(sown))

    def kept(params):
        model = nnx.merge(graphdef, params)
        return float(1 - model.weights(x, e[domain], model.pruners[0])[1])  # the first layer's soft kept share

    before, start = kept(params), float(penalty(params))
    for _ in range(30):
        grads = jax.grad(penalty)(params)
        params = jax.tree_util.tree_map_with_path(
            lambda path, p, g: p if "alpha" in str(path) else p - 0.5 * g, params, grads
        )  # alpha follows its schedule, not the gradient
    assert float(penalty(params)) < start and kept(params) < before
    _, sown = nnx.capture(net, nnx.Intermediate)(BackboneInput(x, x, domain, TABLE[domain]), jnp.float32, True)
    assert float(net.alpha[...]) == pytest.approx(1.5) and float(sum(jax.tree.leaves(sown))) > 0  # alpha + step
    _, sown = nnx.capture(net, nnx.Intermediate)(BackboneInput(x, x, domain, TABLE[domain]), jnp.float32, False)
    assert float(net.alpha[...]) == pytest.approx(1.5) and not jax.tree.leaves(sown)  # inference: no change


def test_adaptdhm_routes_by_nearest_centroid_and_the_centroids_follow_their_examples():
    from sr_jax.model.backbones.adaptdhm import AdaptDHM

    net = AdaptDHM(_cfg(backbone="adaptdhm", adaptdhm_clusters=3), 2, 12, rngs=nnx.Rngs(0))
    h = jnp.eye(3, 32)  # three orthogonal directions
    net.centroids[...] = jnp.eye(3, 32) * 5.0 + 0.01
    np.testing.assert_array_equal(np.asarray(net.route(h)), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(net.route(-h[:1] + 2 * h[2:3])), [2])  # cosine, whatever the norm
    x, domain = jax.random.normal(jax.random.key(8), (16, 12)), jnp.zeros(16, jnp.int32)
    before = np.asarray(net.centroids[...])
    _run(net, x, domain, False)
    np.testing.assert_array_equal(np.asarray(net.centroids[...]), before)  # inference: no move
    shared = net.shared(x, jnp.float32)
    chosen = np.asarray(net.route(shared))
    _run(net, x, domain, True)
    moved = np.asarray(net.centroids[...])
    for c in range(3):
        if (chosen == c).any():  # towards the mean of its examples
            target = np.asarray(shared)[chosen == c].mean(0)
            assert np.linalg.norm(moved[c] - target) < np.linalg.norm(before[c] - target)
        else:
            np.testing.assert_array_equal(moved[c], before[c])
    out = np.asarray(_run(net, x, domain, False).experts[:, 0])
    layer = net.clusters.all_layers(shared, jnp.float32)  # [B, C, h]: every cluster's layer on every example
    routed = np.asarray(net.route(shared))
    expected = np.asarray(shared) + np.maximum(np.asarray(layer)[np.arange(16), routed], 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # each example through its cluster's layer


def test_sarnet_transfers_by_domain_and_adds_a_debias_expert_of_the_domain_alone():
    from sr_jax.model.backbones.sarnet import SARNet

    net = SARNet(_cfg(backbone="sarnet"), 3, 12, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(9), (6, 12))
    out = _run(net, x, jnp.array([0, 0, 0, 1, 1, 1]), False).experts[:, 0]
    bumped = net.transfer.bias[...].at[1].add(1.0)  # domain 1's feature transfer only
    net.transfer.bias[...] = bumped
    after = _run(net, x, jnp.array([0, 0, 0, 1, 1, 1]), False).experts[:, 0]
    np.testing.assert_array_equal(np.asarray(after[:3]), np.asarray(out[:3]))
    assert not np.allclose(np.asarray(after[3:]), np.asarray(out[3:]))
    e = TABLE
    debias = np.asarray(net.debias(e, jnp.float32))  # one vector per domain
    net.debias.layers[-1].bias[...] = net.debias.layers[-1].bias[...] + 0.5  # moves every domain's bias term
    shifted = _run(net, x, jnp.array([0, 0, 0, 1, 1, 1]), False).experts[:, 0]
    new = np.asarray(net.debias(e, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(shifted - after), (new - debias)[[0, 0, 0, 1, 1, 1]], rtol=1e-5, atol=1e-6
    )  # the debias expert adds to the mix, read from the domain alone


def _stats_after(tmp_path, name, steps, model, train=None, finetune=None):
    """The batch statistics of a run after `steps` train steps, and before them."""
    from sr_jax.training import loop, restore, trainer

    cfg = config(TINY, model=model, train={"checkpoint_every": 100, **(train or {})}, finetune=finetune or {})
    run = trainer.build_run(cfg, tmp_path / name)
    start = restore.initial_state(run.spec)
    mask = sr_model.stats_mask(run.spec.program.graphdef, start.params)
    before = jax.tree.map(lambda m, p: np.asarray(p) if m else None, mask, start.params)
    after = loop.train(run, start, until=steps).params
    run.close()
    return before, jax.tree.map(lambda m, p: np.asarray(p) if m else None, mask, after)


def test_adasparse_sharpens_alpha_once_per_step_whatever_the_accumulation(tmp_path):
    """Issue 41: alpha was bumped once per micro-batch (2.5, 4.0, 7.0 after 3 steps at grad_accum 1, 2, 4)."""
    model = {"backbone": "adasparse", "adasparse_alpha_step": 0.5}
    for accum in (1, 2, 4):
        _, after = _stats_after(tmp_path, f"accum-{accum}", 3, model, train={"grad_accum": accum})
        assert float(after["l1"]["backbone"]["alpha"]) == pytest.approx(2.5), accum


def test_the_statistics_of_a_frozen_level_do_not_move(tmp_path):
    """Issue 41: with L1 frozen, AdaptDHM's centroids moved and AdaSparse's alpha grew; they are L1's and shared."""
    for backbone in ("adaptdhm", "adasparse"):
        before, after = _stats_after(tmp_path, backbone, 3, {"backbone": backbone}, finetune={"freeze": ["l1"]})
        jax.tree.map(np.testing.assert_array_equal, before, after)
        _, trained = _stats_after(tmp_path, f"{backbone}-trained", 3, {"backbone": backbone})
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained)))
