"""T5 with `scan_layers`: the same model as the unscanned stacks (logits, cached greedy decoding,
gradients, a sharded train step), the layout conversion both ways, and every loader with scan on."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from test_t5 import _logits, greedy_with_cache

from llm3d_jax import loading
from llm3d_jax.convert.t5 import stack_blocks, unstack_blocks
from llm3d_jax.model import llm3d, t5

# Different encoder and decoder depths: a mix-up of the two stacks cannot go unnoticed.
TINY = t5.T5Config.tiny(num_layers=3, num_decoder_layers=2, dropout_rate=0.0)


pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _golden(goldens_dir, name, **overrides):
    module, params = loading.load_t5(os.path.join(goldens_dir, "t5", name), **overrides)
    io = dict(np.load(os.path.join(goldens_dir, "t5", f"{name}_io.npz")))
    return module, params, io


def _assert_trees_close(got, want, rel=1e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=0, atol=rel * np.abs(np.asarray(b)).max() + 1e-9
        ),
        got,
        want,
    )


def test_stacked_layout_roundtrip_and_logical_names():
    params = t5.init_params(t5.T5(TINY))
    stacked = stack_blocks(params, TINY)
    scanned = t5.T5(dataclasses.replace(TINY, scan_layers=True))
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(
        lambda: scanned.init(jax.random.key(0), input_ids=ids, decoder_input_ids=ids)
    )["params"]
    want = jax.tree.map(lambda x: x.shape, nn.unbox(boxed))
    assert jax.tree.map(np.shape, stacked) == want
    assert want["encoder"]["block"]["mlp"]["wo"]["kernel"] == (3, 64, 32)
    assert want["decoder"]["block"]["cross_attn"]["q"]["kernel"] == (2, 32, 32)
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked, TINY), params)
    # Stacked block params lead with the `layers` axis (replicated by the rules table).
    for stack in ("encoder", "decoder"):
        leaves = jax.tree.leaves(
            boxed[stack]["block"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        assert leaves and all(leaf.names[0] == "layers" for leaf in leaves)
        assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)
    with pytest.raises(ValueError, match="leading axis 3 != 2 layers"):
        unstack_blocks(stacked, dataclasses.replace(TINY, num_layers=2))


@pytest.mark.parametrize("name", ["t5_v10", "flan_t5"])
def test_scanned_logits_equal_unscanned_and_transformers(goldens_dir, name):
    """Loaded with scan on (and remat for FlanT5): encoder and decoder stacks both scanned."""
    module, params, io = _golden(goldens_dir, name)
    scanned, stacked, _ = _golden(goldens_dir, name, scan_layers=True, remat=name == "flan_t5")
    assert scanned.config.scan_layers and "block" in stacked["encoder"]
    jax.tree.map(np.testing.assert_array_equal, stacked, stack_blocks(params, module.config))
    inputs = {k: io[k] for k in ("input_ids", "attention_mask")}
    inputs.update(
        decoder_input_ids=io["decoder_input_ids"],
        decoder_attention_mask=io["decoder_attention_mask"],
    )
    want = np.asarray(_logits(module, params, **inputs))
    got = np.asarray(_logits(scanned, stacked, **inputs))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, io["logits"], atol=1e-4, rtol=0)


def test_scanned_cached_greedy_decoding_equals_unscanned(goldens_dir):
    module, params, io = _golden(goldens_dir, "flan_t5")
    scanned, stacked, _ = _golden(goldens_dir, "flan_t5", scan_layers=True)
    steps = io["generated"].shape[1] - 1
    args = (io["input_ids"], io["attention_mask"], steps)
    tokens, logits, cache = greedy_with_cache(module, params, *args)
    s_tokens, s_logits, s_cache = greedy_with_cache(scanned, stacked, *args)
    np.testing.assert_array_equal(np.asarray(s_tokens), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(s_tokens), io["generated"][:, 1:])
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), atol=1e-5, rtol=0)
    # Unscanned: one dict per block; scanned: the same arrays stacked on axis 1. Batch on axis 0.
    config = module.config
    assert len(cache["layers"]) == config.num_decoder_layers and "k" not in cache
    assert s_cache["k"].shape == (2, config.num_decoder_layers, steps, config.num_heads, 8)
    for name in ("k", "v", "cross_k", "cross_v"):
        per_layer = np.stack([np.asarray(layer[name]) for layer in cache["layers"]], axis=1)
        np.testing.assert_allclose(np.asarray(s_cache[name]), per_layer, atol=1e-5, rtol=0)
    for leaf in jax.tree.leaves(s_cache):
        assert leaf.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(s_cache["index"]), [steps, steps])


def test_scanned_gradients_equal_unscanned():
    ids = jnp.arange(14, dtype=jnp.int32).reshape(2, 7) * 5
    dec = jnp.arange(10, dtype=jnp.int32).reshape(2, 5) + 3
    config = dataclasses.replace(TINY, loc_offset=100, loc_bins=8)
    params = t5.init_params(t5.T5(config))

    def grads(p, **flags):
        module = t5.T5(dataclasses.replace(config, **flags))
        loss = lambda p: jnp.mean(
            module.apply({"params": p}, input_ids=ids, decoder_input_ids=dec) ** 2
        )
        return jax.jit(jax.grad(loss))(p)

    reference = grads(params)
    stacked = stack_blocks(params, config)
    _assert_trees_close(grads(stacked, scan_layers=True), stack_blocks(reference, config))
    _assert_trees_close(
        grads(stacked, scan_layers=True, remat=True), stack_blocks(reference, config)
    )


def _train_step_on_mesh(scan: bool, host_params, mesh):
    """One experiments/train.py step (sharded state, donated, jitted with shardings) of the tiny
    3D-LLM with everything trainable -> (loss, new trainable params, param shardings)."""
    from llm3d_jax.train import optimizer, sharding, synthetic
    from llm3d_jax.train import state as state_lib
    from llm3d_jax.train import step as step_lib

    config = llm3d.with_overrides(_tiny_llm3d(), scan_layers=scan)
    module = llm3d.LLM3D(config)
    params = loading.relayout_llm_layers(host_params, _tiny_llm3d(), scan)
    patterns = (".*",)
    example = llm3d.example_inputs(config, points=16)
    init_fn = lambda rng: module.init(rng, **example, deterministic=True)["params"]
    boxed = state_lib.abstract_params(init_fn)
    trainable_abs, _, trainable_sh, frozen_sh = state_lib.param_shardings(boxed, mesh, patterns)
    schedule = optimizer.make_schedule(lr=1e-2, min_lr=1e-3, warmup_steps=0, total_steps=4)
    # Plain SGD: the update is the gradient, so comparing params compares gradients (Adam's
    # first step is lr * sign(g), which amplifies float noise in near-zero gradients).
    tx = optax.sgd(schedule)
    state_sh = state_lib.state_shardings(tx, trainable_abs, trainable_sh, mesh)
    data = synthetic.SyntheticBatches(
        batch_size=8,
        num_points=16,
        feature_dim=config.feature_dim,
        prompt_len=6,
        answer_len=5,
        vocab_size=config.llm.loc_offset,
        answer_offset=config.llm.loc_offset,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
    )
    train_step = jax.jit(
        step_lib.make_train_step(module, tx, schedule, 1),
        in_shardings=(
            state_sh,
            frozen_sh,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
        ),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_from_params(params, tx, patterns, state_sh, frozen_sh)
        state, metrics = train_step(state, frozen, next(data), jax.random.key(1))
    return jax.device_get(metrics), jax.device_get(state.params), trainable_sh


def _tiny_llm3d():
    config = llm3d.LLM3DConfig.tiny(num_points=16)
    # No dropout in the LLM: scanned blocks draw other dropout masks than unrolled ones.
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, dropout_rate=0.0))


def test_sharded_train_step_with_scan_equals_unscanned():
    from llm3d_jax.train import sharding

    mesh = sharding.make_mesh((2, 2, 2))
    host = jax.device_get(llm3d.init_params(llm3d.LLM3D(_tiny_llm3d()), seed=0))
    metrics, params, _ = _train_step_on_mesh(False, host, mesh)
    s_metrics, s_params, s_shardings = _train_step_on_mesh(True, host, mesh)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    for key in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(s_metrics[key], metrics[key], rtol=1e-5, err_msg=key)
    # The stacked kernels keep their fsdp/tensor sharding behind a replicated layer axis.
    q = s_shardings["llm"]["encoder"]["block"]["self_attn"]["q"]["kernel"]
    assert q.spec == P(None, "fsdp", "tensor")
    _assert_trees_close(s_params, loading.relayout_llm_layers(params, _tiny_llm3d(), True))


def test_build_model_stacks_a_loaded_blip2_t5_and_exports_roundtrip(goldens_dir, tmp_path):
    """experiments/train.py with `model.scan_layers` on a BLIP-2 FlanT5 directory; an export of
    the scanned model reloads scanned, and build_model unstacks it for an unscanned run."""
    import ml_collections

    from llm3d_jax.infer import exported
    from llm3d_jax.train.setup import build_model

    def config(pretrained, scan):
        return ml_collections.ConfigDict(
            dict(
                data=dict(num_points=16),
                model=dict(pretrained=pretrained, scan_layers=scan, dtype="float32", remat=True),
            )
        )

    blip2 = os.path.join(goldens_dir, "llm3d", "blip2_tiny")
    module, params = build_model(config(blip2, True))
    assert module.config.llm.scan_layers and module.config.llm.remat
    assert jax.tree.map(np.shape, params) == jax.tree.map(
        lambda x: x.shape, llm3d.abstract_params(module)
    )
    plain, plain_params = loading.load_llm3d(blip2)
    io = dict(np.load(os.path.join(goldens_dir, "llm3d", "blip2_tiny_io.npz")))
    inputs = {k: io[k] for k in llm3d.example_inputs(module.config)}
    np.testing.assert_allclose(
        np.asarray(_logits(module, params, **inputs)),
        np.asarray(_logits(plain, plain_params, **inputs)),
        atol=1e-5,
        rtol=0,
    )

    out = str(tmp_path / "model")
    exported.export(out, module, params, params_format="safetensors")
    reloaded, reloaded_params = loading.load_llm3d(out)
    assert reloaded.config.llm.scan_layers
    jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)
    unscanned, unscanned_params = build_model(config(out, False))
    assert not unscanned.config.llm.scan_layers
    jax.tree.map(np.testing.assert_array_equal, unscanned_params, plain_params)
