"""T5 / FlanT5: parity with HF transformers (committed goldens), KV-cache decoding, location rows."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax import loading
from llm3d_jax.fileio import InputError
from llm3d_jax.model import t5

VARIANTS = ["t5_v10", "flan_t5"]
LOGICAL_NAMES = {"batch", "embed", "mlp", "heads", "kv", "vocab", "relpos", "norm", None}


pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _logits(module, params, **inputs):
    """One jitted forward: cheaper on CPU than op-by-op dispatch, even for a single call."""
    return jax.jit(lambda p, x: module.apply({"params": p}, **x))(params, inputs)


def _golden(goldens_dir, name):
    module, params = loading.load_t5(os.path.join(goldens_dir, "t5", name))
    io = dict(np.load(os.path.join(goldens_dir, "t5", f"{name}_io.npz")))
    return module, params, io


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name)
    assert module.config.tie_word_embeddings == (name == "t5_v10")
    assert module.config.scale_decoder_outputs == (name == "t5_v10")
    assert module.config.gated == (name == "flan_t5")
    logits = _logits(
        module,
        params,
        input_ids=io["input_ids"],
        attention_mask=io["attention_mask"],
        decoder_input_ids=io["decoder_input_ids"],
        decoder_attention_mask=io["decoder_attention_mask"],
    )
    assert logits.dtype == jnp.float32 and logits.shape == io["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=1e-4, rtol=0)


def test_relative_position_buckets_match_transformers(goldens_dir):
    table = np.load(os.path.join(goldens_dir, "t5", "buckets.npz"))
    rel = table["relative_position"]
    for name, (num_buckets, max_distance) in {"default": (32, 128), "tiny": (8, 16)}.items():
        for direction in ("bidirectional", "causal"):
            ours = t5.relative_position_buckets(
                rel, direction == "bidirectional", num_buckets, max_distance
            )
            np.testing.assert_array_equal(ours, table[f"{name}_{direction}"])


def greedy_with_cache(module, params, input_ids, attention_mask, steps):
    """Greedy decoding through encode -> init_cache -> decode_step, jitted; the start token is
    0. -> (tokens [B,steps], logits [B,steps,V], final cache). Also used by test_t5_scan."""

    @jax.jit
    def run(params, input_ids, attention_mask):
        variables = {"params": params}
        encoded = module.apply(variables, input_ids, attention_mask, method=t5.T5.encode)
        cache = module.apply(variables, encoded, attention_mask, steps, method=t5.T5.init_cache)

        def step(carry, _):
            cache, token = carry
            logits, cache = module.apply(variables, cache, token, method=t5.T5.decode_step)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            return (cache, token), (token, logits)

        start = jnp.zeros(input_ids.shape[:1], jnp.int32)
        (cache, _), (tokens, logits) = jax.lax.scan(step, (cache, start), length=steps)
        return tokens.T, logits.swapaxes(0, 1), cache

    return run(params, input_ids, attention_mask)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_greedy_decoding_matches_reference(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name)
    reference = io["generated"]  # [B, 1 + 8]: start token then 8 greedy tokens
    steps = reference.shape[1] - 1

    tokens, step_logits, cache = greedy_with_cache(
        module, params, io["input_ids"], io["attention_mask"], steps
    )
    np.testing.assert_array_equal(np.asarray(tokens), reference[:, 1:])
    assert int(cache["index"][0]) == steps
    # Every cache array carries the batch on axis 0 (beam search reorders along it).
    for leaf in jax.tree_util.tree_leaves(cache):
        assert leaf.shape[0] == 2
    forced = _logits(
        module,
        params,
        input_ids=io["input_ids"],
        attention_mask=io["attention_mask"],
        decoder_input_ids=reference[:, :-1],
    )
    np.testing.assert_allclose(np.asarray(step_logits), np.asarray(forced), atol=1e-4, rtol=0)


def test_inputs_embeds_equal_input_ids(goldens_dir):
    module, params, io = _golden(goldens_dir, "flan_t5")
    embeds = np.asarray(params["shared"])[io["input_ids"]]
    kwargs = dict(attention_mask=io["attention_mask"], decoder_input_ids=io["decoder_input_ids"])
    a = _logits(module, params, input_ids=io["input_ids"], **kwargs)
    b = _logits(module, params, inputs_embeds=embeds, **kwargs)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_location_rows_are_separate_params_with_ids_equal_to_columns(tied):
    """A model whose last 4 base rows are moved into loc_embed/loc_head gives the same logits."""
    small = dict(
        vocab_size=40,
        num_layers=1,
        num_decoder_layers=1,
        tie_word_embeddings=tied,
        scale_decoder_outputs=tied,
        dropout_rate=0.0,
    )
    base = t5.T5(t5.T5Config.tiny(**small))
    ids = jnp.array([[3, 38, 39, 5], [36, 37, 2, 1]], jnp.int32)
    dec = jnp.array([[0, 39, 36], [0, 7, 37]], jnp.int32)
    params = t5.init_params(base)
    loc = t5.T5(t5.T5Config.tiny(**small, loc_offset=36, loc_bins=4))
    loc_params = dict(params, loc_embed=params["shared"][36:])
    if not tied:
        loc_params["loc_head"] = params["lm_head"][:, 36:]
    expected = _logits(base, params, input_ids=ids, decoder_input_ids=dec)
    got = _logits(loc, loc_params, input_ids=ids, decoder_input_ids=dec)
    assert got.shape == (2, 3, 40)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # The base rows at ids >= loc_offset are dead: changing them changes nothing.
    loc_params["shared"] = loc_params["shared"].at[36:].set(100.0)
    if not tied:
        loc_params["lm_head"] = loc_params["lm_head"].at[:, 36:].set(100.0)
    again = _logits(loc, loc_params, input_ids=ids, decoder_input_ids=dec)
    np.testing.assert_allclose(np.asarray(again), np.asarray(expected), atol=1e-5)


def test_from_pretrained_with_location_tokens(goldens_dir):
    path = os.path.join(goldens_dir, "t5", "flan_t5")
    module, params = loading.load_t5(path, loc_bins=16, loc_offset=90)
    assert params["loc_embed"].shape == (16, 32) and params["loc_head"].shape == (32, 16)
    assert len(np.unique(params["loc_embed"], axis=0)) == 16  # distinct new rows
    io = dict(np.load(os.path.join(goldens_dir, "t5", "flan_t5_io.npz")))
    logits = _logits(
        module,
        params,
        input_ids=io["input_ids"],
        decoder_input_ids=np.array([[0, 95, 105]]).repeat(2, 0),
        attention_mask=io["attention_mask"],
    )
    assert logits.shape == (2, 3, 90 + 16)
    # With the default offset (= vocab_size) the base-vocabulary path is untouched.
    module, params = loading.load_t5(path, loc_bins=16)
    assert module.config.loc_offset == 96
    plain = _logits(
        module,
        params,
        input_ids=io["input_ids"],
        attention_mask=io["attention_mask"],
        decoder_input_ids=io["decoder_input_ids"],
        decoder_attention_mask=io["decoder_attention_mask"],
    )
    assert plain.shape[-1] == 96 + 16
    np.testing.assert_allclose(np.asarray(plain)[..., :96], io["logits"], atol=1e-4)


def test_bf16_compute_keeps_fp32_params(goldens_dir):
    path = os.path.join(goldens_dir, "t5", "flan_t5")
    module, params = loading.load_t5(path, dtype="bfloat16")
    io = dict(np.load(os.path.join(goldens_dir, "t5", "flan_t5_io.npz")))
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
    logits = _logits(
        module,
        params,
        input_ids=io["input_ids"],
        attention_mask=io["attention_mask"],
        decoder_input_ids=io["decoder_input_ids"],
        decoder_attention_mask=io["decoder_attention_mask"],
    )
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - io["logits"]).max()
    assert err < 0.05 * np.abs(io["logits"]).max(), err


def test_dropout_is_controlled_by_deterministic_and_rng():
    module = t5.T5(t5.T5Config.tiny(num_layers=1, num_decoder_layers=1, dropout_rate=0.3))
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    params = t5.init_params(module)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(deterministic, seed):
        return module.apply(
            {"params": params},
            input_ids=ids,
            decoder_input_ids=ids,
            deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed)},
        )

    def run(deterministic, seed=0):
        return np.asarray(forward(deterministic, seed))

    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    np.testing.assert_array_equal(run(False, 0), run(False, 0))
    assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-3
    assert np.abs(run(False, 0) - run(True)).max() > 1e-3


def test_remat_gives_the_same_gradients():
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)

    def grads(remat):
        module = t5.T5(t5.T5Config.tiny(num_layers=1, num_decoder_layers=1, remat=remat))
        params = t5.init_params(module)
        loss = lambda p: module.apply(
            {"params": p},
            input_ids=ids,
            decoder_input_ids=ids,
            deterministic=False,
            rngs={"dropout": jax.random.key(3)},
        ).sum()
        return jax.jit(jax.grad(loss))(params)

    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
        grads(False),
        grads(True),
    )


def test_params_carry_logical_axis_names():
    module = t5.T5(t5.T5Config.tiny(loc_offset=100, loc_bins=8))
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(
        lambda: module.init(jax.random.key(0), input_ids=ids, decoder_input_ids=ids)
    )
    leaves = jax.tree_util.tree_leaves(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim


def _copy(goldens_dir, tmp_path, name="flan_t5"):
    path = tmp_path / name
    shutil.copytree(os.path.join(goldens_dir, "t5", name), path)
    return path


def test_bad_checkpoints_give_one_line_errors(goldens_dir, tmp_path):
    with pytest.raises(InputError, match="checkpoint directory not found"):
        loading.load_t5(tmp_path / "nope")
    path = _copy(goldens_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps(dict(config, d_ff=50)))
    with pytest.raises(InputError) as err:
        loading.load_t5(path)
    msg = str(err.value)
    assert "shape mismatch" in msg and "DenseReluDense" in msg and "(48, 32)" in msg and "50" in msg
    assert "\n" not in msg

    (path / "config.json").write_text(json.dumps(dict(config, feed_forward_proj="gated-swish7")))
    with pytest.raises(InputError, match="unsupported T5 activation"):
        loading.load_t5(path)

    (path / "config.json").write_text(
        json.dumps(dict(config, architectures=["BertModel"], model_type="bert"))
    )
    with pytest.raises(InputError, match="unsupported architecture BertModel"):
        loading.load_t5(path)

    (path / "config.json").unlink()
    with pytest.raises(InputError, match="missing config.json"):
        loading.load_t5(path)
