"""Decoder-only LLMs (OPT, Llama 3, Qwen2, Mistral): parity with HF transformers (committed
goldens), KV-cache decoding, masks, location rows, scan/remat, conversion errors."""

import dataclasses
import json
import os
import shutil
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llm3d_jax import loading
from llm3d_jax.convert.decoder import stack_layers
from llm3d_jax.fileio import InputError
from llm3d_jax.model import decoder

VARIANTS = ["opt", "opt_postln", "llama3", "qwen2", "mistral"]
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "norm", "pos", "layers", None}


pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _forward(module, params, **inputs):
    """Jitted forward -> numpy logits (one compile beats op-by-op dispatch on CPU)."""
    run = jax.jit(lambda p, kw: module.apply({"params": p}, **kw))
    return np.asarray(run(params, inputs))


def _golden(goldens_dir, name, **overrides):
    module, params = loading.load_decoder(os.path.join(goldens_dir, "decoder", name), **overrides)
    io = dict(np.load(os.path.join(goldens_dir, "decoder", f"{name}_io.npz")))
    return module, params, io


def _logits(module, params, io):
    return _forward(module, params, input_ids=io["input_ids"], attention_mask=io["attention_mask"])


def _assert_close_on_real_tokens(got, io, atol=1e-4):
    valid = io["attention_mask"].astype(bool)
    assert got.shape == io["logits"].shape
    np.testing.assert_allclose(got[valid], io["logits"][valid], atol=atol, rtol=0)


EXPECTED_CONFIG = {
    "opt": dict(family="opt", pre_norm=True, final_norm=True, tie_word_embeddings=True),
    "opt_postln": dict(family="opt", pre_norm=False, final_norm=False, embed_dim=16),
    "llama3": dict(family="llama", num_kv_heads=2, rope_type="llama3", tie_word_embeddings=False),
    "qwen2": dict(family="llama", qkv_bias=True, out_bias=False, layer_windows=(0, 4)),
    "mistral": dict(family="llama", head_dim=16, num_kv_heads=2, layer_windows=(5, 5)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name)
    for field, value in EXPECTED_CONFIG[name].items():
        assert getattr(module.config, field) == value, field
    logits = _logits(module, params, io)
    assert logits.dtype == np.float32
    _assert_close_on_real_tokens(logits, io)


def test_llama3_checkpoint_is_sharded_and_its_rope_scaling_matters(goldens_dir):
    path = os.path.join(goldens_dir, "decoder", "llama3")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    module, params, io = _golden(goldens_dir, "llama3")
    inv = decoder.rope_inv_freq(module.config)
    plain = decoder.rope_inv_freq(dataclasses.replace(module.config, rope_type="default"))
    # head_dim 8: one frequency kept, one smoothed, two divided by the factor 8.
    np.testing.assert_allclose(inv[[0, 2, 3]], plain[[0, 2, 3]] / np.array([1, 8, 8]), rtol=1e-6)
    assert plain[1] / 8 < inv[1] < plain[1]
    unscaled = decoder.Decoder(dataclasses.replace(module.config, rope_type="default"))
    diff = np.abs(_logits(unscaled, params, io) - io["logits"])[io["attention_mask"] == 1]
    assert diff.max() > 1e-2  # the golden would catch a missing scaling


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_sliding_window_matters(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name)
    full = decoder.Decoder(dataclasses.replace(module.config, layer_windows=()))
    diff = np.abs(_logits(full, params, io) - io["logits"])
    window = max(module.config.layer_windows)
    # Identical while every key is inside the window, different after.
    assert diff[0, :window].max() < 1e-4
    assert diff[0, window + 1 :].max() > 1e-3


def _greedy(module, params, prompt, steps):
    """Prefill + `steps` cached greedy steps in one jit -> (tokens [B,steps], logits
    [B,steps,V] that chose them, final cache)."""

    @jax.jit
    def run(params, prompt):
        variables = {"params": params}
        cache, logits = module.apply(variables, prompt, None, steps, method=decoder.Decoder.prefill)

        def step(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            next_logits, cache = module.apply(
                variables, cache, token, method=decoder.Decoder.decode_step
            )
            return (next_logits, cache), (token, logits)

        (_, cache), (tokens, all_logits) = jax.lax.scan(step, (logits, cache), length=steps)
        return tokens.T, jnp.moveaxis(all_logits, 0, 1), cache

    return run(params, prompt)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_greedy_decoding_matches_reference(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name)
    prompt, reference = io["gen_prompt"], io["generated"]
    steps = reference.shape[1]
    tokens, step_logits, cache = _greedy(module, params, prompt, steps)
    np.testing.assert_array_equal(np.asarray(tokens), reference)
    assert int(cache["index"][0]) == prompt.shape[1] + steps
    # Every cache array carries the batch on axis 0 (beam search reorders along it).
    for leaf in jax.tree_util.tree_leaves(cache):
        assert leaf.shape[0] == 2
    # The step logits equal one full forward over [prompt; generated].
    full = _forward(module, params, input_ids=np.concatenate([prompt, reference[:, :-1]], axis=1))
    np.testing.assert_allclose(
        np.asarray(step_logits), full[:, prompt.shape[1] - 1 :], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", ["opt_postln", "mistral"])
def test_scan_layers_and_remat_give_the_same_model(goldens_dir, name):
    module, params, io = _golden(goldens_dir, name, scan_layers=True, remat=True)
    assert params["layers"]["attn"]["q"]["kernel"].shape[0] == module.config.num_layers
    _assert_close_on_real_tokens(_logits(module, params, io), io)
    tokens, _, _ = _greedy(module, params, io["gen_prompt"], io["generated"].shape[1])
    np.testing.assert_array_equal(np.asarray(tokens), io["generated"])


def test_padding_anywhere_gives_the_same_real_token_outputs():
    module = decoder.Decoder(
        decoder.DecoderConfig.tiny("llama", layer_windows=(3, 0), init_std=0.2)
    )
    params = decoder.init_params(module)
    ids = jnp.array([[5, 6, 7, 8, 9]], jnp.int32)
    plain = _forward(module, params, input_ids=ids)[0]
    left = jnp.array([[0, 0, 5, 6, 7, 8, 9]], jnp.int32)
    got = _forward(module, params, input_ids=left, attention_mask=left > 0)
    # Sliding windows count slots, so compare with windows only where no pad is in range.
    np.testing.assert_allclose(got[0, 2:4], plain[:2], atol=1e-5)
    middle = jnp.array([[5, 6, 0, 0, 7, 8, 9]], jnp.int32)
    full_attn = decoder.Decoder(decoder.DecoderConfig.tiny("opt", init_std=0.2))
    opt_params = decoder.init_params(full_attn)
    plain = _forward(full_attn, opt_params, input_ids=ids)[0]
    got = _forward(full_attn, opt_params, input_ids=middle, attention_mask=middle > 0)[0]
    np.testing.assert_allclose(got[[0, 1, 4, 5, 6]], plain, atol=1e-5)


def test_prefix_lm_mask():
    config = decoder.DecoderConfig.tiny("llama", prefix_causal=False, init_std=0.2)
    module = decoder.Decoder(config)
    params = decoder.init_params(module)
    ids = jnp.array([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]], jnp.int32)
    prefix_len = jnp.array([3, 4], jnp.int32)
    run = jax.jit(lambda x: module.apply({"params": params}, input_ids=x, prefix_len=prefix_len))
    base = np.asarray(run(ids))
    changed = np.asarray(run(ids.at[:, 2].set(40)))
    # Slot 0 sees slot 2 inside the prefix (bidirectional) ...
    assert np.abs(changed[:, 0] - base[:, 0]).max() > 1e-4
    # ... but nothing after the prefix sees the future.
    later = np.asarray(run(ids.at[:, 5].set(40)))
    np.testing.assert_allclose(later[:, :5], base[:, :5], atol=1e-6)
    # A causal model ignores prefix_len.
    causal = decoder.Decoder(dataclasses.replace(config, prefix_causal=True))
    both = jnp.concatenate([ids, ids.at[:, 2].set(40)])
    c = _forward(causal, params, input_ids=both, prefix_len=jnp.concatenate([prefix_len] * 2))
    np.testing.assert_allclose(c[:2, :2], c[2:, :2], atol=1e-6)
    # Prefill of the bidirectional prefix + cached steps == full prefix-LM forwards.
    cached = _cached_logits(module, params, ids, 4, prefix_len)
    np.testing.assert_allclose(cached, base[:, 3:], atol=1e-5)


def _cached_logits(module, params, ids, prefill_len, prefix_len=None):
    """Prefill ids[:, :prefill_len], then feed the rest one token at a time (teacher forcing)
    -> logits [B, L - prefill_len + 1, V] from the prefill and every cached step."""

    @jax.jit
    def run(params, ids):
        variables = {"params": params}
        rest = ids.shape[1] - prefill_len
        cache, first = module.apply(
            variables,
            ids[:, :prefill_len],
            max_decode_len=rest,
            prefix_len=prefix_len,
            method=decoder.Decoder.prefill,
        )

        def step(cache, token):
            logits, cache = module.apply(
                variables, cache, token, method=decoder.Decoder.decode_step
            )
            return cache, logits

        _, later = jax.lax.scan(step, cache, ids[:, prefill_len:].T)
        return jnp.concatenate([first[:, None], jnp.moveaxis(later, 0, 1)], axis=1)

    return np.asarray(run(params, ids))


def test_inputs_embeds_equal_input_ids(goldens_dir):
    module, params, io = _golden(goldens_dir, "opt_postln")
    embeds = np.asarray(params["embed_tokens"])[io["input_ids"]]
    a = _logits(module, params, io)
    b = _forward(module, params, inputs_embeds=embeds, attention_mask=io["attention_mask"])
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family,tied", [("opt", True), ("llama", False)])
def test_location_rows_are_separate_params_with_ids_equal_to_columns(family, tied):
    """A model whose last 4 base rows are moved into loc_embed/loc_head gives the same logits."""
    base_config = decoder.DecoderConfig.tiny(
        family, vocab_size=40, tie_word_embeddings=tied, init_std=0.2
    )
    base = decoder.Decoder(base_config)
    params = decoder.init_params(base)
    ids = jnp.array([[3, 38, 39, 5, 36], [36, 37, 2, 1, 39]], jnp.int32)
    loc = decoder.Decoder(dataclasses.replace(base_config, loc_offset=36, loc_bins=4))
    loc_params = dict(params, loc_embed=params["embed_tokens"][36:])
    if not tied:
        loc_params["loc_head"] = params["lm_head"][:, 36:]
    expected = _forward(base, params, input_ids=ids)
    got = _forward(loc, loc_params, input_ids=ids)
    assert got.shape == (2, 5, 40)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    # The base rows at ids >= loc_offset are dead: changing them changes nothing.
    loc_params["embed_tokens"] = loc_params["embed_tokens"].at[36:].set(100.0)
    if not tied:
        loc_params["lm_head"] = loc_params["lm_head"].at[:, 36:].set(100.0)
    again = _forward(loc, loc_params, input_ids=ids)
    np.testing.assert_allclose(np.asarray(again), np.asarray(expected), atol=1e-5)


def test_from_pretrained_with_location_tokens(goldens_dir):
    path = os.path.join(goldens_dir, "decoder", "llama3")
    module, params = loading.load_decoder(path, loc_bins=16, loc_offset=90)
    assert params["loc_embed"].shape == (16, 32) and params["loc_head"].shape == (32, 16)
    assert len(np.unique(params["loc_embed"], axis=0)) == 16  # distinct new rows
    logits = _forward(module, params, input_ids=np.array([[3, 95, 105, 7]]))
    assert logits.shape == (1, 4, 90 + 16)
    # With the default offset (= vocab_size) the base-vocabulary path is untouched.
    module, params, io = _golden(goldens_dir, "opt_postln", loc_bins=16)
    assert module.config.loc_offset == 96 and "loc_head" not in params  # tied head
    assert params["loc_embed"].shape == (16, 16)  # word_embed_proj_dim rows
    plain = _logits(module, params, io)
    assert plain.shape[-1] == 96 + 16
    _assert_close_on_real_tokens(plain[..., :96], io)


def test_bf16_compute_keeps_fp32_params(goldens_dir):
    module, params, io = _golden(goldens_dir, "qwen2", dtype="bfloat16")
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
    logits = _logits(module, params, io)
    assert logits.dtype == np.float32
    valid = io["attention_mask"] == 1
    err = np.abs(logits - io["logits"])[valid].max()
    assert err < 0.05 * np.abs(io["logits"]).max(), err


def test_dropout_is_controlled_by_deterministic_and_rng():
    module = decoder.Decoder(decoder.DecoderConfig.tiny("opt", dropout_rate=0.3))
    params = decoder.init_params(module)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)

    @partial(jax.jit, static_argnums=0)
    def forward(deterministic, seed):
        return module.apply(
            {"params": params},
            input_ids=ids,
            deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed)},
        )

    run = lambda deterministic, seed=0: np.asarray(forward(deterministic, seed))

    np.testing.assert_array_equal(run(True, 0), run(True, 1))
    np.testing.assert_array_equal(run(False, 0), run(False, 0))
    assert np.abs(run(False, 0) - run(False, 1)).max() > 1e-3


def test_remat_and_scan_give_the_same_gradients():
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    config = decoder.DecoderConfig.tiny("llama", layer_windows=(0, 3), init_std=0.2)
    params = decoder.init_params(decoder.Decoder(config))

    def grads(p, **flags):
        module = decoder.Decoder(dataclasses.replace(config, **flags))
        loss = lambda p: jnp.mean(module.apply({"params": p}, input_ids=ids) ** 2)
        return jax.jit(jax.grad(loss))(p)

    def assert_same(got, want):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()),
            got,
            want,
        )

    reference = grads(params)
    assert_same(grads(params, remat=True), reference)
    stacked = stack_layers(params, config.num_layers)
    scanned = grads(stacked, scan_layers=True, remat=True)
    assert_same(scanned, stack_layers(reference, config.num_layers))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_params_carry_logical_axis_names(family, scan):
    config = decoder.DecoderConfig.tiny(
        family, loc_offset=100, loc_bins=8, scan_layers=scan, qkv_bias=True, embed_dim=16
    )
    module = decoder.Decoder(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), input_ids=ids))
    leaves = jax.tree_util.tree_leaves(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert set(leaf.names) <= LOGICAL_NAMES and len(leaf.names) == leaf.value.ndim
    layer_leaves = jax.tree_util.tree_leaves(
        boxed["params"]["layers" if scan else "layers_0"],
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    assert all((leaf.names[0] == "layers") == scan for leaf in layer_leaves)


def test_from_hf_reads_the_older_rope_layout():
    config = decoder.DecoderConfig.from_hf(
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "vocab_size": 50,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [7, 8],
        }
    )
    assert config.rope_type == "llama3" and config.rope_theta == 500000.0
    assert config.rope_factor == 32.0 and config.rope_original_max_positions == 8192
    assert config.head_dim == 16 and config.eos_token_id == 7 and config.loc_offset == 50
    # A JSON round trip (exported models) gives back an equal, hashable config.
    again = decoder.DecoderConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert again == config and hash(again) == hash(config)
    mistral = decoder.DecoderConfig.from_hf(
        {"model_type": "mistral", "num_hidden_layers": 3, "sliding_window": None}
    )
    assert mistral.layer_windows == ()


def _copy(goldens_dir, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(os.path.join(goldens_dir, "decoder", name), path)
    return path


def test_bad_checkpoints_give_one_line_errors(goldens_dir, tmp_path):
    with pytest.raises(InputError, match="checkpoint directory not found"):
        loading.load_decoder(tmp_path / "nope")
    path = _copy(goldens_dir, tmp_path, "mistral")
    config = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps(dict(config, intermediate_size=50)))
    with pytest.raises(InputError) as err:
        loading.load_decoder(path)
    msg = str(err.value)
    assert "shape mismatch" in msg and "mlp" in msg and "50" in msg and "\n" not in msg

    rope = dict(rope_type="yarn", rope_theta=1e6, factor=4.0)
    (path / "config.json").write_text(json.dumps(dict(config, rope_parameters=rope)))
    with pytest.raises(InputError, match="unsupported rope type 'yarn'"):
        loading.load_decoder(path)

    (path / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(InputError, match="unsupported model_type 'gpt2'"):
        loading.load_decoder(path)

    # A tied config ignores the checkpoint's lm_head (as HF does on load).
    (path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    _, params = loading.load_decoder(path)
    assert "lm_head" not in params

    shards = _copy(goldens_dir, tmp_path, "llama3")
    os.remove(shards / "model-00002-of-00004.safetensors")
    with pytest.raises(InputError, match="weight shard listed in the index is missing"):
        loading.load_decoder(shards)

    untied = _copy(goldens_dir, tmp_path, "qwen2")
    qwen = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps(dict(qwen, tie_word_embeddings=False)))
    with pytest.raises(InputError, match="missing weights.*lm_head"):
        loading.load_decoder(untied)


# ------------------------------------------------------------------ the 3D-LLM layout


def _prefix_batch(config, rng, batch=4, prefix=6, answer=5):
    """Random prefix embeddings with padding inside, answers mixing base and location ids."""
    prefix_mask = np.ones((batch, prefix), bool)
    prefix_mask[1, 4:] = False
    prefix_mask[2, 2:4] = False
    answer_mask = np.ones((batch, answer), bool)
    answer_mask[0, 3:] = False
    answer_ids = rng.integers(3, config.num_logits, (batch, answer)).astype(np.int32)
    return dict(
        prefix_embeds=rng.standard_normal((batch, prefix, config.token_dim)).astype(np.float32),
        prefix_mask=prefix_mask,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
    )


def _answer_logits(module, params, batch, **kw):
    run = jax.jit(
        lambda p, b: module.apply({"params": p}, **b, **kw, method=decoder.Decoder.answer_logits)
    )
    return np.asarray(run(params, batch))


def test_answer_logits_equal_cached_decoding():
    config = decoder.DecoderConfig.tiny(
        "llama", prefix_causal=False, loc_offset=120, loc_bins=16, init_std=0.2
    )
    module = decoder.Decoder(config)
    params = decoder.init_params(module)
    batch = _prefix_batch(config, np.random.default_rng(0))
    logits = _answer_logits(module, params, batch)
    assert logits.shape == (4, 5, 136)

    @jax.jit
    def cached(params, batch):
        variables = {"params": params}
        prefix = batch["prefix_embeds"]
        cache, first = module.apply(
            variables,
            inputs_embeds=prefix,
            attention_mask=batch["prefix_mask"],
            max_decode_len=4,
            prefix_len=jnp.full(prefix.shape[:1], prefix.shape[1]),
            method=decoder.Decoder.prefill,
        )

        def step(cache, token):
            out, cache = module.apply(variables, cache, token, method=decoder.Decoder.decode_step)
            return cache, out

        _, later = jax.lax.scan(step, cache, batch["answer_ids"][:, :-1].T)
        return jnp.concatenate([first[:, None], jnp.moveaxis(later, 0, 1)], axis=1)

    valid = batch["answer_mask"]
    np.testing.assert_allclose(np.asarray(cached(params, batch))[valid], logits[valid], atol=1e-5)
    # The prefix mask matters: a bidirectional prefix changes what the first answer token sees.
    other = decoder.Decoder(dataclasses.replace(config, prefix_causal=True))
    assert np.abs(_answer_logits(other, params, batch) - logits)[valid].max() > 1e-3


def test_blip2_opt_language_model_matches_transformers(goldens_dir):
    """The OPT half of a BLIP-2 OPT directory, fed the reference's Q-Former output."""
    from llm3d_jax.convert.decoder import decoder_params
    from llm3d_jax.convert.hf import read_hf_dir

    path = os.path.join(goldens_dir, "decoder", "blip2_opt")
    config, tensors = read_hf_dir(path)
    module, params = decoder_params(
        config["text_config"], tensors, source=path, prefix="language_model."
    )
    assert module.config.family == "opt" and module.config.tie_word_embeddings
    io = dict(np.load(os.path.join(goldens_dir, "decoder", "blip2_opt_io.npz")))
    weight, bias = tensors["language_projection.weight"], tensors["language_projection.bias"]
    queries = io["query_output"] @ weight.T + bias
    prefix = np.concatenate([queries, params["embed_tokens"][io["prompt_ids"]]], axis=1)
    prefix_mask = np.concatenate([np.ones(queries.shape[:2], bool), io["prompt_mask"] == 1], 1)
    batch = dict(
        prefix_embeds=prefix,
        prefix_mask=prefix_mask,
        answer_ids=io["answer_ids"],
        answer_mask=io["answer_mask"],
    )
    logits = _answer_logits(module, params, batch)
    valid = io["answer_mask"] == 1
    np.testing.assert_allclose(logits[valid], io["logits"][valid], atol=1e-4, rtol=0)

    @jax.jit
    def greedy(params):
        variables = {"params": params}
        cache, logits = module.apply(
            variables,
            inputs_embeds=prefix,
            attention_mask=prefix_mask,
            max_decode_len=6,
            method=decoder.Decoder.prefill,
        )

        def step(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            logits, cache = module.apply(
                variables, cache, token, method=decoder.Decoder.decode_step
            )
            return (logits, cache), token

        _, tokens = jax.lax.scan(step, (logits, cache), length=6)
        return tokens.T

    np.testing.assert_array_equal(np.asarray(greedy(params)), io["generated"])


def _answer_loss(module, params, batch):
    logits = module.apply({"params": params}, **batch, method=decoder.Decoder.answer_logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["answer_ids"])
    mask = batch["answer_mask"].astype(jnp.float32)
    return (ce * mask).sum() / mask.sum()


def test_training_on_tiny_data_lowers_the_loss():
    config = decoder.DecoderConfig.tiny("opt", loc_offset=120, loc_bins=8, init_std=0.1)
    module = decoder.Decoder(config)
    params = decoder.init_params(module)
    batch = _prefix_batch(config, np.random.default_rng(1), batch=8)
    tx = optax.adam(3e-3)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: _answer_loss(module, p, batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_sharded_loss_and_grads_equal_single_device():
    from llm3d_jax.train import sharding

    config = decoder.DecoderConfig.tiny(
        "llama", scan_layers=True, loc_offset=120, loc_bins=8, init_std=0.2
    )
    module = decoder.Decoder(config)
    params = decoder.init_params(module)
    batch = _prefix_batch(config, np.random.default_rng(2), batch=8)
    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, b: _answer_loss(module, p, b)))
    single_loss, single_grads = loss_and_grads(params, batch)

    mesh = sharding.make_mesh((2, 2, 2))
    boxed = jax.eval_shape(
        lambda: module.init(jax.random.key(0), input_ids=jnp.zeros((1, 1), jnp.int32))
    )
    param_sh = sharding.logical_shardings(boxed["params"], mesh)
    assert param_sh["embed_tokens"].spec == P("tensor", "fsdp")
    assert param_sh["layers"]["attn"]["k"]["kernel"].spec == P(None, "fsdp", "tensor")
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, param_sh)
        sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        loss, grads = loss_and_grads(sharded_params, sharded_batch)
    np.testing.assert_allclose(float(loss), float(single_loss), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()),
        grads,
        single_grads,
    )
