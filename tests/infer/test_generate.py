"""Bucketed batched generation (against the tiny stand-in) and answer decoding to metres."""

import functools

import jax
import numpy as np
import pytest

from llm3d_jax import tokens
from llm3d_jax.data.preprocess import TextEncoder
from llm3d_jax.infer.decode import DecodeConfig, greedy_decode
from llm3d_jax.infer.generate import (
    bucket_size,
    decode_answer,
    encode_prompt,
    generate,
    pad_to_buckets,
)
from tests.infer import tiny_lm


def test_bucket_size():
    assert [bucket_size(n) for n in (0, 1, 2, 3, 4, 5, 17)] == [1, 1, 2, 4, 4, 8, 32]
    assert bucket_size(3, minimum=16) == 16 and bucket_size(20, minimum=16) == 32


def test_pad_to_buckets_shapes_and_rows():
    inputs = dict(
        features=np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4),
        voxels=np.zeros((3, 2, 3), np.int32),
        point_mask=np.ones((3, 2), bool),
        prompt_ids=np.full((3, 40), 7, np.int32),
        prompt_mask=np.arange(40)[None].repeat(3, 0) < np.array([[5], [18], [3]]),
    )
    out, rows = pad_to_buckets(inputs, pad_id=0)
    assert rows == 3
    assert out["prompt_ids"].shape == (4, 32) and out["features"].shape == (4, 2, 4)
    np.testing.assert_array_equal(out["features"][3], inputs["features"][2])  # copied row
    np.testing.assert_array_equal(out["prompt_mask"][:3], inputs["prompt_mask"][:, :32])
    # Columns are added when the prompt is shorter than the smallest bucket.
    short = dict(
        inputs, prompt_ids=inputs["prompt_ids"][:, :8], prompt_mask=inputs["prompt_mask"][:, :8]
    )
    out, _ = pad_to_buckets(short, pad_id=0)
    assert out["prompt_ids"].shape == (4, 16)
    assert np.all(out["prompt_ids"][:, 8:] == 0) and not out["prompt_mask"][:, 8:].any()


def test_generate_is_independent_of_batching_and_padding():
    module = tiny_lm.TinyLM(vocab=7)
    params, inputs = tiny_lm.init(module, seed=3, batch=3, prompt_len=6)
    inputs = jax.tree.map(np.asarray, inputs)
    config = DecodeConfig(max_new_tokens=5)
    ids, scores = generate(module, params, inputs, config, model_fns=tiny_lm)
    assert ids.shape == (3, 5) and scores.shape == (3,)

    # The unbucketed reference: prefill + greedy on the raw shapes.
    cache, logits0 = tiny_lm.prefill(module, params, **inputs, max_decode_len=5)
    step = functools.partial(tiny_lm.decode_step, module, params)
    ref_ids, ref_scores = greedy_decode(step, cache, logits0, max_len=5, eos_id=1, pad_id=0)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    # One row at a time (batch bucket 1) gives the same rows.
    for r in range(3):
        row = {k: v[r : r + 1] for k, v in inputs.items()}
        one, _ = generate(module, params, row, config, model_fns=tiny_lm)
        np.testing.assert_array_equal(one[0], ids[r])


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = ["the brown chair is next to the table", "a white cabinet in the corner"] * 5
    tok = tokens.train_tokenizer(texts, 120, tmp_path_factory.mktemp("tok"))
    return TextEncoder.create(tok, 256)


GRID = dict(grid_origin=np.array([-1.0, 0.0, 2.0]), grid_voxel=0.5)


def _ids(encoder, text):
    return encoder.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_decode_answer_boxes_points_and_cut_at_eos(encoder):
    loc = lambda i: encoder.loc_offset + i
    words = _ids(encoder, "the chair")
    box, point = [loc(i) for i in (0, 2, 4, 1, 3, 5)], [loc(10), loc(11), loc(12)]
    ids = words + box + _ids(encoder, "next to") + point
    ids += [encoder.eos_id, loc(7), 5, encoder.pad_id]  # after EOS: ignored
    answer = decode_answer(
        encoder.tokenizer,
        ids,
        eos_id=encoder.eos_id,
        loc_offset=encoder.loc_offset,
        loc_bins=256,
        score=-1.5,
        **GRID,
    )
    # Voxel centres: origin + (i + 0.5) * 0.5.
    np.testing.assert_allclose(answer.boxes, [[-0.75, 1.25, 4.25, -0.25, 1.75, 4.75]])
    np.testing.assert_allclose(answer.points, [[4.25, 5.75, 8.25]])
    assert answer.text.startswith("the chair")
    assert "<box>" in answer.text and "<pt>" in answer.text and "<loc" not in answer.text
    assert answer.token_ids == tuple(ids[: ids.index(encoder.eos_id)])
    assert answer.score == -1.5
    np.testing.assert_allclose(answer.first_box(), answer.boxes[0])


def test_decode_answer_drops_malformed_runs(encoder):
    loc = lambda i: encoder.loc_offset + i
    words = _ids(encoder, "table")
    # 4 tokens (no box, no point), then an inverted box (xmin > xmax), then pad/unk tokens.
    ids = (
        [loc(1), loc(2), loc(3), loc(4)] + words + [loc(9), loc(0), loc(0), loc(1), loc(1), loc(1)]
    )
    ids += [encoder.pad_id, encoder.tokenizer.unk_token_id]
    answer = decode_answer(
        encoder.tokenizer,
        ids,
        eos_id=encoder.eos_id,
        loc_offset=encoder.loc_offset,
        loc_bins=256,
        **GRID,
    )
    assert answer.text == "table"
    assert answer.boxes.shape == (0, 6) and answer.points.shape == (0, 3)
    assert answer.first_box() is None


def test_decode_answer_keeps_valid_boxes_beside_stray_tags(encoder):
    loc = lambda i: encoder.loc_offset + i
    # Plain-text "<box>" pieces (no closing tag) before a valid location-token box.
    ids = _ids(encoder, "]2.0 <box>0.") + [loc(i) for i in (0, 0, 0, 1, 1, 1)]
    answer = decode_answer(
        encoder.tokenizer,
        ids,
        eos_id=encoder.eos_id,
        loc_offset=encoder.loc_offset,
        loc_bins=256,
        **GRID,
    )
    np.testing.assert_allclose(answer.boxes, [[-0.75, 0.25, 2.25, -0.25, 0.75, 2.75]])


def test_encode_prompt_rejects_a_prompt_longer_than_the_context(encoder):
    ids = encode_prompt(encoder, "where is <pt>0 0 3</pt>", max_len=32, **GRID)
    assert ids[-1] == encoder.eos_id  # T5-style suffix kept
    assert [i - encoder.loc_offset for i in ids if encoder.is_loc(i)] == [2, 0, 2]
    with pytest.raises(ValueError, match="longer than the model's context of 8"):
        encode_prompt(encoder, "the brown chair is next to the table " * 3, max_len=8, **GRID)
