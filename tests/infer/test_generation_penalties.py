"""Generation penalties: hand-made cases of `process_scores`, and token-identical greedy / beam
search against transformers' `generate` on a tiny random T5 (tests/goldens/generation, made by
tools/make_goldens_generation.py)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm3d_jax import loading
from llm3d_jax.infer.decode import DecodeConfig, decode, ngram_ban, process_scores
from llm3d_jax.model import t5

EOS = 1
NINF = -np.inf


def _process(scores, history, t, **options):
    scores = jnp.asarray(scores, jnp.float32)
    history = jnp.asarray(history, jnp.int32)
    return np.asarray(
        process_scores(scores, history, t, max_len=history.shape[1], eos_id=EOS, **options)
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    scores = [[2.0, -1.0, 0.6, -3.0, 0.0]]
    history = [[0, 2, 2, 4]]  # positions >= t = 2 are ignored
    out = _process(scores, history, 2, repetition_penalty=1.5)
    np.testing.assert_allclose(out, [[2.0 / 1.5, -1.0, 0.6 / 1.5, -3.0, 0.0]])
    # the decoder start token counts, as transformers counts it for encoder-decoder models
    out = _process(scores, history, 0, repetition_penalty=2.0, start_id=3)
    np.testing.assert_allclose(out, [[2.0, -1.0, 0.6, -6.0, 0.0]])
    # a penalty below 1 rewards seen tokens
    out = _process(scores, history, 2, repetition_penalty=0.5)
    np.testing.assert_allclose(out, [[4.0, -1.0, 1.2, -3.0, 0.0]])


def test_no_repeat_ngram_bans_the_token_that_would_repeat_an_ngram():
    seq = jnp.asarray([[5, 6, 5, 7, 5, 0, 0]])
    # bigrams so far (length 5): 5 6, 6 5, 5 7, 7 5; the suffix 5 bans 6 and 7
    assert np.flatnonzero(ngram_ban(seq, 5, 2, 9)[0]).tolist() == [6, 7]
    # trigrams: 5 6 5, 6 5 7, 5 7 5; no trigram starts with the suffix "7 5"
    assert np.flatnonzero(ngram_ban(seq, 5, 3, 9)[0]).tolist() == []
    # 5 6 7 5 6: the suffix "5 6" starts the trigram 5 6 7
    assert np.flatnonzero(ngram_ban(jnp.asarray([[5, 6, 7, 5, 6]]), 5, 3, 9)[0]).tolist() == [7]
    # nothing before n tokens; n = 1 bans every token seen
    assert not ngram_ban(seq, 1, 2, 9).any()
    assert np.flatnonzero(ngram_ban(seq, 3, 1, 9)[0]).tolist() == [5, 6]
    out = _process(np.zeros((1, 9)), [[5, 6, 5, 0]], 3, no_repeat_ngram_size=2)
    assert np.flatnonzero(np.isinf(out[0])).tolist() == [6]
    # with a start token 5 the sequence is 5 5 6 5: the suffix 5 bans 5 and 6
    out = _process(np.zeros((1, 9)), [[5, 6, 5, 0]], 3, no_repeat_ngram_size=2, start_id=5)
    assert np.flatnonzero(np.isinf(out[0])).tolist() == [5, 6]


def test_min_new_tokens_forbids_eos_before():
    scores = np.zeros((2, 4))
    assert np.isinf(_process(scores, np.zeros((2, 5)), 2, min_new_tokens=3)[:, EOS]).all()
    assert not np.isinf(_process(scores, np.zeros((2, 5)), 3, min_new_tokens=3)).any()
    # all options off: unchanged
    np.testing.assert_array_equal(_process([[1.0, -2.0]], [[0, 1]], 2), [[1.0, -2.0]])


# ---------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def golden(goldens_dir):
    root = os.path.join(goldens_dir, "generation")
    module, params = loading.load_t5(os.path.join(root, "tiny_t5"))
    io = dict(np.load(os.path.join(root, "io.npz")))
    with open(os.path.join(root, "settings.json")) as f:
        table = json.load(f)
    return module, params, io, table


def _generate(module, params, io, config):
    @functools.partial(jax.jit, static_argnums=0)
    def run(config, params, input_ids, attention_mask):
        variables = {"params": params}
        encoded = module.apply(variables, input_ids, attention_mask, method=t5.T5.encode)
        cache = module.apply(
            variables, encoded, attention_mask, config.max_new_tokens, method=t5.T5.init_cache
        )
        start = jnp.full((input_ids.shape[0],), config.start_id, jnp.int32)
        logits0, cache = module.apply(variables, cache, start, method=t5.T5.decode_step)
        step = lambda cache, ids: module.apply(variables, cache, ids, method=t5.T5.decode_step)
        return decode(step, cache, logits0, config)

    with jax.default_matmul_precision("highest"):
        ids, scores = run(config, params, io["input_ids"], io["attention_mask"])
    return np.asarray(ids), np.asarray(scores)


SETTINGS = [
    "greedy",
    "greedy_repetition",
    "greedy_reward",
    "greedy_ngram",
    "greedy_min_new",
    "greedy_min_length",
    "greedy_all",
    "beam",
    "beam_release",
    "beam_ngram_min_never",
    "beam_negative_early",
    "beam_long_never",
    "beam_long_heuristic",
    "beam_long_early",
]


@pytest.mark.parametrize("name", SETTINGS)
def test_token_identical_to_transformers_generate(golden, name):
    module, params, io, table = golden
    setting = table["settings"][name]
    config = DecodeConfig(
        max_new_tokens=table["max_new_tokens"],
        eos_id=table["eos_id"],
        pad_id=table["pad_id"],
        start_id=module.config.decoder_start_token_id,
        **setting["decode"],
    )
    ids, scores = _generate(module, params, io, config)
    np.testing.assert_array_equal(ids, io[f"ids_{name}"])
    if config.strategy == "beam":
        np.testing.assert_allclose(scores, io[f"score_{name}"], rtol=1e-4, atol=1e-5)
    # each penalty setting (early_stopping rule) changes some answer against its plain
    # counterpart (another rule): matching the golden needs the option applied
    if setting["differs_from"] is not None:
        assert not np.array_equal(io[f"ids_{name}"], io[f"ids_{setting['differs_from']}"])


def test_goldens_cover_every_setting(golden):
    assert sorted(golden[3]["settings"]) == sorted(SETTINGS)
