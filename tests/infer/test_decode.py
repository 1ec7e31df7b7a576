"""Decoding loops against the tiny stand-in model (tests/infer/tiny_lm.py)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax.infer.decode import (
    DecodeConfig,
    beam_search,
    decode,
    filter_logits,
    greedy_decode,
    sample_decode,
)
from tests.infer import tiny_lm

EOS, PAD = 1, 0


def _setup(vocab=7, batch=4, prompt_len=5, seed=3):
    module = tiny_lm.TinyLM(vocab=vocab)
    params, inputs = tiny_lm.init(module, seed=seed, batch=batch, prompt_len=prompt_len)
    return module, params, inputs


def _run(module, params, inputs, max_len, fn, rng=None, **kw):
    """Prefill + decode loop under one jit (compiled once per module / loop / settings)."""
    run = _compiled(module, fn, max_len, tuple(sorted(kw.items())))
    return jax.tree.map(np.asarray, run(params, inputs, rng))


@functools.cache
def _compiled(module, fn, max_len, kw):
    @jax.jit
    def run(params, inputs, rng):
        cache, logits0 = tiny_lm.prefill(module, params, **inputs, max_decode_len=max_len)
        step = functools.partial(tiny_lm.decode_step, module, params)
        extra = {} if rng is None else {"rng": rng}
        return fn(
            step, cache, logits0, max_len=max_len, eos_id=EOS, pad_id=PAD, **extra, **dict(kw)
        )

    return run


def _full_logp(module, params, inputs, answers):
    """float64 [B,La,V] log-probs of every answer position by one teacher-forced forward."""
    answers = jnp.asarray(answers, jnp.int32)
    logits = jax.jit(module.apply)(
        {"params": params}, **inputs, answer_ids=answers, answer_mask=jnp.ones_like(answers)
    )
    return np.asarray(jax.nn.log_softmax(logits, -1), np.float64)


def test_stand_in_cache_matches_full_forward():
    module, params, inputs = _setup()
    answers = jax.random.randint(jax.random.key(3), (4, 4), 0, module.vocab)
    full = jax.jit(module.apply)(
        {"params": params}, **inputs, answer_ids=answers, answer_mask=jnp.ones_like(answers)
    )

    @jax.jit
    def cached(params, inputs, answers):
        cache, logits = tiny_lm.prefill(module, params, **inputs, max_decode_len=4)
        steps = [logits]
        for t in range(3):
            logits, cache = tiny_lm.decode_step(module, params, cache, answers[:, t])
            steps.append(logits)
        return jnp.stack(steps, 1)

    np.testing.assert_allclose(cached(params, inputs, answers), full, atol=1e-5)


def test_greedy_equals_argmax_of_full_forwards():
    module, params, inputs = _setup(batch=6)
    max_len = 6
    tokens, logp = _run(module, params, inputs, max_len, greedy_decode)

    # Reference: grow the answer one token at a time, re-running the whole model each step.
    expected = np.full((6, max_len), PAD)
    done = np.zeros(6, bool)
    ref_logp = np.zeros(6)
    for t in range(max_len):
        # A fixed-size buffer (one compile): position t only sees the tokens before it.
        lp = _full_logp(module, params, inputs, np.where(np.arange(max_len) < t, expected, PAD))
        tok = lp[:, t].argmax(-1)
        tok = np.where(done, PAD, tok)
        ref_logp += np.where(done, 0.0, lp[np.arange(6), t, tok])
        expected[:, t] = tok
        done |= tok == EOS
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5)
    # The seed gives both kinds of rows: stopped at EOS and cut at max_len.
    assert done.any() and not done.all()
    stopped = (tokens == EOS).any(1)
    assert np.all(
        tokens[stopped][np.cumsum(tokens[stopped] == EOS, 1) - (tokens[stopped] == EOS) > 0] == PAD
    )


def test_beam_width_one_equals_greedy():
    module, params, inputs = _setup(batch=6)
    g_tokens, g_logp = _run(module, params, inputs, 6, greedy_decode)
    b_tokens, b_score = _run(module, params, inputs, 6, beam_search, num_beams=1)
    np.testing.assert_array_equal(b_tokens, g_tokens)
    np.testing.assert_allclose(b_score, g_logp, rtol=1e-5)


def _all_answers(vocab, max_len):
    """Every possible output: EOS-terminated sequences shorter than max_len and all of length max_len."""
    words = [w for w in range(vocab) if w != EOS]
    out = []
    for n in range(max_len):
        out += [list(p) + [EOS] for p in itertools.product(words, repeat=n)]
    out += [list(p) for p in itertools.product(range(vocab), repeat=max_len) if EOS not in p[:-1]]
    return out


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_best_enumerated_sequence(length_penalty):
    vocab, max_len, batch = 4, 3, 5
    module, params, inputs = _setup(vocab=vocab, batch=batch, seed=2)
    answers = _all_answers(vocab, max_len)
    n = len(answers)
    padded = np.array([a + [PAD] * (max_len - len(a)) for a in answers])
    # One forward over every (row, answer) pair: row-major [batch * n].
    lp = _full_logp(
        module,
        params,
        jax.tree.map(lambda x: jnp.repeat(x, n, 0), inputs),
        np.tile(padded, (batch, 1)),
    ).reshape(batch, n, max_len, vocab)
    lengths = np.array([len(a) for a in answers])
    token_lp = np.take_along_axis(lp, padded[None, :, :, None], -1)[..., 0]
    token_lp = np.where(np.arange(max_len) < lengths[:, None], token_lp, 0.0)
    scores = token_lp.sum(-1) / lengths**length_penalty
    best = scores.argmax(1)

    # Width 36 >= 3 * 3 * 4 live extensions: nothing is ever pruned, so the search is exact.
    tokens, score = _run(
        module, params, inputs, max_len, beam_search, num_beams=36, length_penalty=length_penalty
    )
    np.testing.assert_array_equal(tokens, padded[best])
    np.testing.assert_allclose(score, scores.max(1), rtol=1e-5)
    if length_penalty == 0.0:
        # Non-trivial instance: greedy misses the best sequence on some rows.
        _, g_logp = _run(module, params, inputs, max_len, greedy_decode)
        assert np.any(g_logp < scores.max(1) - 1e-4)
        assert np.all(g_logp <= scores.max(1) + 1e-5)
        # A narrower beam is never worse than greedy here, and never better than exact.
        _, b2 = _run(module, params, inputs, max_len, beam_search, num_beams=2)
        assert np.all(b2 <= scores.max(1) + 1e-5)


def test_filter_logits_hand_computed():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
    ninf = -np.inf
    np.testing.assert_array_equal(np.isinf(filter_logits(logits, top_k=2)), [[0, 0, 0, 1]])
    # top_p 0.6: mass before token 0 is 0 (< 0.6), before a 0.2 token 0.5 (< 0.6) -> kept, ties
    # are kept together; before the 0.1 token 0.9 -> dropped.
    out = np.asarray(filter_logits(logits, top_p=0.6))
    assert out[0, 3] == ninf and np.all(np.isfinite(out[0, :3]))
    out = np.asarray(filter_logits(logits, top_p=0.5))  # mass before the 0.2s is 0.5: dropped
    np.testing.assert_array_equal(np.isfinite(out), [[1, 0, 0, 0]])
    np.testing.assert_array_equal(filter_logits(logits), logits)


def test_sampling_matches_the_filtered_distribution():
    module, params, inputs = _setup(vocab=7, batch=1)
    many = jax.tree.map(lambda x: jnp.repeat(x, 4000, 0), inputs)
    tokens, _ = _run(
        module, params, many, 1, sample_decode, rng=jax.random.key(0), temperature=0.7, top_p=0.9
    )
    _, logits0 = tiny_lm.prefill(module, params, **inputs, max_decode_len=1)
    expected = np.asarray(jax.nn.softmax(filter_logits(logits0 / 0.7, top_p=0.9)))[0]
    freq = np.bincount(tokens[:, 0], minlength=7) / len(tokens)
    assert np.all(freq[expected == 0] == 0)
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_sampling_top_k_one_is_greedy_and_rng_is_reproducible():
    module, params, inputs = _setup(batch=6)
    g_tokens, _ = _run(module, params, inputs, 6, greedy_decode)
    s_tokens, _ = _run(module, params, inputs, 6, sample_decode, rng=jax.random.key(1), top_k=1)
    np.testing.assert_array_equal(s_tokens, g_tokens)
    a, _ = _run(module, params, inputs, 6, sample_decode, rng=jax.random.key(5))
    b, _ = _run(module, params, inputs, 6, sample_decode, rng=jax.random.key(5))
    c, _ = _run(module, params, inputs, 6, sample_decode, rng=jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_decode_dispatch_and_config_validation():
    module, params, inputs = _setup(batch=2)

    @functools.partial(jax.jit, static_argnums=2)
    def run(params, inputs, cfg, rng=None):
        cache, logits0 = tiny_lm.prefill(module, params, **inputs, max_decode_len=4)
        step = functools.partial(tiny_lm.decode_step, module, params)
        return decode(step, cache, logits0, cfg, rng)

    b, _ = run(params, inputs, DecodeConfig(strategy="beam", max_new_tokens=4, num_beams=1))
    g, _ = run(params, inputs, DecodeConfig(max_new_tokens=4))
    np.testing.assert_array_equal(b, g)
    s, _ = run(
        params,
        inputs,
        DecodeConfig(strategy="sample", max_new_tokens=4, top_k=1),
        jax.random.key(0),
    )
    np.testing.assert_array_equal(s, g)
    with pytest.raises(ValueError, match="rng"):
        run(params, inputs, DecodeConfig(strategy="sample", max_new_tokens=4))
    for bad in [
        dict(strategy="nucleus"),
        dict(top_p=0.0),
        dict(temperature=0.0),
        dict(max_new_tokens=0),
        dict(num_beams=0),
        dict(length_penalty=float("nan")),
        dict(early_stopping="sometimes"),
        dict(early_stopping=1),
        dict(repetition_penalty=0.0),
        dict(no_repeat_ngram_size=-1),
        dict(min_new_tokens=-1),
    ]:
        with pytest.raises(ValueError):
            DecodeConfig(**bad)


def test_decode_options_of_the_commands_make_one_config():
    """experiments/eval.py and tools/ask.py share these options (infer/decode.py)."""
    import argparse

    from llm3d_jax.infer.decode import add_decode_arguments, decode_settings

    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    settings = decode_settings(parser.parse_args([]))
    assert settings["strategy"] == "greedy" and settings["early_stopping"] == "never"
    assert "loc_bins" not in settings  # the grammar stays the model's
    args = parser.parse_args(
        ["--strategy", "beam", "--early_stopping", "heuristic", "--free_locations"]
    )
    settings = decode_settings(args)
    assert settings["early_stopping"] is False and settings["loc_bins"] == 0
    assert DecodeConfig(**settings).strategy == "beam"
    with pytest.raises(ValueError, match="top_p"):
        decode_settings(parser.parse_args(["--top_p", "0"]))
