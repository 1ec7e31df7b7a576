"""3D-LLM with a decoder-only LLM: BLIP-2 OPT directory, prefill/decode, training, sharding."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm3d_jax import loading
from llm3d_jax.model import llm3d
from llm3d_jax.model.decoder import DecoderConfig
from llm3d_jax.train import step as step_lib

INPUTS = (
    "features",
    "voxels",
    "point_mask",
    "prompt_ids",
    "prompt_mask",
    "answer_ids",
    "answer_mask",
)


def _answer_loss(logits, answer_ids, answer_mask):
    """(mean cross-entropy, token accuracy) over the answer tokens: the train step's sums."""
    ce, correct, count = step_lib.answer_loss_sums(logits, answer_ids, answer_mask)
    count = jnp.maximum(count, 1.0)
    return ce / count, correct / count


def _tiny_decoder(family="llama", **llm_fields):
    config = llm3d.LLM3DConfig.tiny_decoder(family)
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, **llm_fields))


def _tiny_decoder_batch(config, seed=0, b=8, n=16, lp=6, la=5):
    rng = np.random.default_rng(seed)
    offset = config.llm.loc_offset
    prompt_mask = np.ones((b, lp), bool)
    prompt_mask[1, 4:] = False
    answer_mask = np.ones((b, la), bool)
    answer_mask[0, 3:] = False
    answer_ids = rng.integers(3, offset, (b, la)).astype(np.int32)
    answer_ids[:, 1] = offset + rng.integers(0, config.llm.loc_bins, b)  # location tokens
    return dict(
        features=rng.standard_normal((b, n, config.feature_dim)).astype(np.float32),
        voxels=rng.integers(0, 256, (b, n, 3)).astype(np.int32),
        point_mask=np.ones((b, n), bool),
        prompt_ids=rng.integers(3, offset, (b, lp)).astype(np.int32),
        prompt_mask=prompt_mask,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
    )


def test_blip2_opt_directory_matches_pytorch(goldens_dir):
    module, params = loading.load_llm3d(
        os.path.join(goldens_dir, "decoder", "blip2_opt"), loc_bins=0
    )
    assert isinstance(module.config.llm, DecoderConfig) and module.config.llm.family == "opt"
    io = dict(np.load(os.path.join(goldens_dir, "decoder", "blip2_opt_io.npz")))
    logits = jax.jit(lambda p, b: module.apply({"params": p}, **b))(
        params, {k: io[k] for k in INPUTS}
    )
    valid = io["answer_mask"] == 1
    np.testing.assert_allclose(np.asarray(logits)[valid], io["logits"][valid], atol=1e-4, rtol=0)

    @jax.jit
    def greedy(params):
        cache, logits = llm3d.prefill(
            module, params, **{k: io[k] for k in INPUTS[:5]}, max_decode_len=6
        )
        tokens = []
        for _ in range(6):
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            tokens.append(token)
            logits, cache = llm3d.decode_step(module, params, cache, token)
        return jnp.stack(tokens, 1)

    np.testing.assert_array_equal(np.asarray(greedy(params)), io["generated"])


@pytest.mark.parametrize("prefix_causal", [True, False])
def test_decoder_prefill_and_decode_step_match_teacher_forcing(prefix_causal):
    config = _tiny_decoder(prefix_causal=prefix_causal)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    batch = _tiny_decoder_batch(config, b=2)
    forced = jax.jit(lambda p, b: module.apply({"params": p}, **b))(params, batch)

    @jax.jit
    def cached(params, batch):
        cache, logits = llm3d.prefill(
            module, params, **{k: batch[k] for k in INPUTS[:5]}, max_decode_len=4
        )
        out = [logits]
        for t in range(4):
            logits, cache = llm3d.decode_step(module, params, cache, batch["answer_ids"][:, t])
            out.append(logits)
        return jnp.stack(out, 1), cache

    logits, cache = cached(params, batch)
    for leaf in jax.tree.leaves(cache):
        assert leaf.shape[0] == 2
    valid = batch["answer_mask"]
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(forced)[valid], atol=1e-5)


def _loss(module, params, batch):
    logits = module.apply({"params": params}, **batch)
    return _answer_loss(logits, batch["answer_ids"], batch["answer_mask"])[0]


def test_decoder_training_on_tiny_data_lowers_the_loss():
    config = _tiny_decoder("opt", prefix_causal=False)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    batch = _tiny_decoder_batch(config)
    mask = llm3d.trainable_mask(params)
    # What does not train gets no update (optax.masked would pass raw gradients through).
    tx = optax.multi_transform({True: optax.adam(2e-2), False: optax.set_to_zero()}, mask)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: _loss(module, p, batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_decoder_sharded_loss_and_grads_equal_single_device():
    from llm3d_jax.train import sharding

    config = _tiny_decoder(scan_layers=True)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    batch = _tiny_decoder_batch(config)
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, b: _loss(module, p, b)))
    single_loss, single_grads = loss_and_grads(params, batch)
    mesh = sharding.make_mesh((2, 2, 2))
    inputs = llm3d.example_inputs(config, points=4)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    shardings = sharding.logical_shardings(boxed["params"], mesh)
    with jax.set_mesh(mesh):
        loss, grads = loss_and_grads(
            jax.device_put(params, shardings),
            jax.device_put(batch, sharding.batch_sharding(mesh)),
        )
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max() + 1e-9),
        grads,
        single_grads,
    )


def test_decoder_knobs_through_with_overrides():
    config = llm3d.with_overrides(_tiny_decoder(), prefix_causal=False, scan_layers=True)
    assert config.llm.prefix_causal is False and config.llm.scan_layers is True
    with pytest.raises(ValueError, match="decoder-only"):
        llm3d.with_overrides(llm3d.LLM3DConfig.tiny(), prefix_causal=False)
    assert llm3d.with_overrides(llm3d.LLM3DConfig.tiny(), scan_layers=True).llm.scan_layers


@pytest.mark.parametrize("llm_dir", [None, "llama3"])
def test_train_build_model_reads_scanqa_llama_style_configs(llm_dir):
    """experiments/train.py: BLIP-2 OPT (or its Q-Former + another HF LLM), scanned layers."""
    import ml_collections

    from llm3d_jax.train.setup import build_model

    goldens = os.path.join(os.path.dirname(__file__), "..", "goldens", "decoder")
    config = ml_collections.ConfigDict(
        dict(
            data=dict(num_points=16),
            model=dict(
                pretrained=os.path.join(goldens, "blip2_opt"),
                llm_pretrained=os.path.join(goldens, llm_dir) if llm_dir else "",
                prefix_causal=False,
                scan_layers=True,
                dtype="float32",
                remat=False,
            ),
        )
    )
    module, params = build_model(config)
    assert module.config.llm.scan_layers and not module.config.llm.prefix_causal
    want = jax.tree.map(lambda x: x.shape, llm3d.abstract_params(module))
    got = jax.tree.map(lambda x: np.shape(x), params)
    assert got == want
