"""The config-derived FLOP count that MFU divides by agrees with XLA's count of the same graph."""

import jax
import jax.numpy as jnp
import pytest

from llm3d_jax.model import decoder as decoder_lib
from llm3d_jax.model import qformer as qformer_lib
from llm3d_jax.model import t5 as t5_lib
from llm3d_jax.train import metrics


def _xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_t5_forward_flops_match_xla():
    cfg = t5_lib.T5Config.tiny(d_model=128, d_kv=32, d_ff=256, num_heads=4, vocab_size=512)
    module = t5_lib.T5(cfg)
    ids, dec = jnp.zeros((2, 24), jnp.int32), jnp.zeros((2, 12), jnp.int32)
    params = jax.eval_shape(
        lambda: module.init(jax.random.key(0), input_ids=ids, decoder_input_ids=dec)
    )
    xla = _xla_flops(lambda p: module.apply(p, input_ids=ids, decoder_input_ids=dec), params) / 2
    assert cfg.forward_flops(24, 12) == pytest.approx(xla, rel=0.05)


def test_qformer_forward_flops_match_xla():
    cfg = qformer_lib.QFormerConfig.tiny(
        hidden_size=128, intermediate_size=512, encoder_hidden_size=96, num_hidden_layers=4
    )
    module = qformer_lib.QFormer(cfg)
    points = jnp.zeros((2, 100, cfg.encoder_hidden_size))
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), points))
    xla = _xla_flops(lambda p: module.apply(p, points), params) / 2
    assert metrics._qformer_flops(cfg, cfg.num_query_tokens, 100) == pytest.approx(xla, rel=0.1)


def test_training_flops_are_three_forwards():
    qf, t5 = qformer_lib.QFormerConfig.tiny(), t5_lib.T5Config.tiny()
    forward = (
        metrics._qformer_flops(qf, qf.num_query_tokens, 50)
        + 2 * qf.num_query_tokens * qf.hidden_size * t5.d_model
        + t5.forward_flops(qf.num_query_tokens + 7, 5)
    )
    assert metrics.llm3d_flops(qf, t5, 50, 7, 5) == 3 * forward


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("opt", {}), ("opt", dict(embed_dim=16))],
)
def test_decoder_forward_flops_match_xla(family, overrides):
    """24 slots, logits at each: a prefix of 0 and an answer of 24."""
    cfg = decoder_lib.DecoderConfig.tiny(
        family, hidden_size=128, head_dim=32, intermediate_size=256, vocab_size=512, **overrides
    )
    module = decoder_lib.Decoder(cfg)
    ids = jnp.zeros((2, 24), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), input_ids=ids))
    xla = _xla_flops(lambda p: module.apply(p, input_ids=ids), params) / 2
    assert cfg.forward_flops(0, 24) == pytest.approx(xla, rel=0.05)


@pytest.mark.parametrize("family", ["t5", "llama", "opt"])
def test_llm3d_training_flops_match_xla_for_every_family(family):
    """The MFU numerator of experiments/train.py, whichever LLM the 3D-LLM has."""
    from llm3d_jax.model import llm3d

    if family == "t5":
        config = llm3d.LLM3DConfig.tiny()
    else:
        config = llm3d.LLM3DConfig.tiny_decoder(family)
    module = llm3d.LLM3D(config)
    inputs = llm3d.example_inputs(config, batch=2, prompt_len=8, answer_len=6)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    xla = _xla_flops(lambda p: module.apply(p, **inputs), params) / 2
    points = inputs["features"].shape[1]
    want = metrics.llm3d_flops(config.qformer, config.llm, points, 8, 6) / 3
    assert want == pytest.approx(xla, rel=0.1)
