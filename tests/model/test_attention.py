"""llm3d_jax.model.attention: the fused path and the written-out dropout path agree (masks, bias,
grouped K/V heads, scale); the implementation setting is a config field that round-trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.model import attention, llm3d
from llm3d_jax.model.decoder import DecoderConfig
from llm3d_jax.model.qformer import QFormerConfig
from llm3d_jax.model.t5 import T5Config
from llm3d_jax.model.vit import ViTConfig


def _inputs(batch=2, length=5, keys=7, heads=4, kv_heads=2, dim=8):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, length, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, keys, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, keys, kv_heads, dim)).astype(np.float32)
    bias = rng.standard_normal((1, heads, length, keys)).astype(np.float32)
    mask = rng.random((batch, 1, length, keys)) > 0.3
    mask[1, 0, 2] = False  # one query row sees no key at all
    return q, k, v, bias, mask


def _reference(q, k, v, bias, mask, scale):
    """Plain numpy multi-head attention, K/V heads repeated for grouped-query attention."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale + bias
    logits = np.where(mask, logits, np.finfo(np.float32).min)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fused_and_dropout_paths_match_a_numpy_reference(kv_heads):
    q, k, v, bias, mask = _inputs(kv_heads=kv_heads)
    want = _reference(q, k, v, bias, mask, scale=0.3)
    fused = attention.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=0.3)
    # an identity "dropout" takes the written-out path
    written = attention.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=0.3, dropout=lambda w: w
    )
    np.testing.assert_allclose(np.asarray(fused), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(written), want, atol=1e-5)
    # the row without keys attends uniformly (as the PyTorch references)
    uniform = np.repeat(v[1], q.shape[2] // kv_heads, axis=1).mean(0)
    np.testing.assert_allclose(np.asarray(fused)[1, 2], uniform, atol=1e-5)


def test_default_scale_and_dropout_zeroes_weights():
    q, k, v, _, _ = _inputs(kv_heads=4)
    bias0 = np.zeros((1, 4, 5, 7), np.float32)
    mask1 = np.ones((1, 1, 5, 7), bool)
    want = _reference(q, k, v, bias0, mask1, scale=8**-0.5)
    np.testing.assert_allclose(
        np.asarray(attention.dot_product_attention(q, k, v)), want, atol=1e-5
    )
    dropped = attention.dot_product_attention(q, k, v, dropout=jnp.zeros_like)
    np.testing.assert_array_equal(np.asarray(dropped), 0.0)


def test_implementation_is_a_checked_config_field_that_round_trips():
    with pytest.raises(ValueError, match="attention_impl"):
        attention.check_implementation("flash")
    for cls in (QFormerConfig, T5Config, DecoderConfig, ViTConfig):
        assert cls().attention_impl is None
        with pytest.raises(ValueError, match="attention_impl"):
            cls(attention_impl="flash")
    for config in (llm3d.LLM3DConfig.tiny(), llm3d.LLM3DConfig.tiny_decoder("llama")):
        cudnn = llm3d.with_overrides(config, attention_impl="cudnn")
        assert cudnn.qformer.attention_impl == cudnn.llm.attention_impl == "cudnn"
        assert llm3d.LLM3DConfig.from_dict(json.loads(json.dumps(cudnn.to_dict()))) == cudnn
        # a config written before the field existed still loads, with the default
        old = cudnn.to_dict()
        del old["qformer"]["attention_impl"], old["llm"]["attention_impl"]
        assert llm3d.LLM3DConfig.from_dict(old) == config


def test_xla_setting_gives_the_default_numbers():
    config = llm3d.LLM3DConfig.tiny_decoder("llama")
    inputs = llm3d.example_inputs(config, batch=2, points=6)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module)
    xla = llm3d.LLM3D(llm3d.with_overrides(config, attention_impl="xla"))
    run = jax.jit(lambda m, p: m.apply({"params": p}, **inputs), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(run(module, params)), np.asarray(run(xla, params)))
