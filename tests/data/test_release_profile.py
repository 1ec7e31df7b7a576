"""The `release` data profile feeds what the released 3D-LLM feeds: its question text, its point
rows (no mask) and one row per distinct answer, held to tests/fixtures/release/cases.json
(tools/make_release_cases.py: the release's own formulas, torch.randperm included)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_tfds_fixtures import write_fixture  # noqa: E402

from data_pipeline.tfds import build  # noqa: E402
from llm3d_jax import data, tokens  # noqa: E402
from llm3d_jax.data import preprocess  # noqa: E402
from llm3d_jax.data.sources import SceneJoin, language_record  # noqa: E402
from llm3d_jax.fileio import write_jsonl_atomic  # noqa: E402

CASES = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "release", "cases.json"
)
SHAPES = dict(num_points=48, prompt_len=24, answer_len=12)


@pytest.fixture(scope="module")
def cases():
    with open(CASES) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def env(tmp_path_factory, cases):
    """The fixture scenes with the cases' records (ScanQA-style questions, repeated answers)."""
    root = str(tmp_path_factory.mktemp("release"))
    features_dir, _, scenes, _ = write_fixture(root, num_scenes=6, records_per_scene=4)
    records = [
        {k: v for k, v in r.items() if not k.startswith("release_")} for r in cases["records"]
    ]
    path = os.path.join(root, "scanqa.jsonl")
    write_jsonl_atomic(path, records)
    out = os.path.join(root, "tfds")
    build(features_dir, path, out, "scanqa", val_fraction=0.34, seed=0)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in cases["records"]]
    tok_dir = os.path.join(root, "tok")
    tokens.train_tokenizer([*texts, "a the of room object"], vocab_size=400, out_dir=tok_dir)
    encoder = preprocess.TextEncoder.create(tokens.load_tokenizer(tok_dir), 256)
    return out, tok_dir, scenes, {r["id"]: r for r in cases["records"]}, encoder


def _iterator(env, train=True, **kw):
    out, tok_dir = env[:2]
    make = data.make_train_iterator if train else data.make_eval_iterator
    return make(out, tok_dir, batch_size=4, read_threads=2, datasets="scanqa", **{**SHAPES, **kw})


def _rows(it, count: int) -> list[tuple[dict, dict]]:
    """The first `count` rows of the stream: ({key: row array}, metadata)."""
    rows = []
    while len(rows) < count:
        batch = next(it)
        for r, meta in enumerate(it.last_metadata):
            rows.append(({k: np.asarray(v[r]) for k, v in batch.items()}, meta))
    return rows[:count]


def test_question_text_is_the_releases(cases):
    for case in cases["questions"]:
        assert preprocess.release_question(case["question"]) == case["release"], case
    for record in cases["records"]:
        assert preprocess.release_question(record["prompt"]) == record["release_prompt"]


def test_location_placeholders_pass_through_whole():
    text = "Where is <pt>1.250 0.500 0.750</pt>? Next to THE box."
    assert (
        preprocess.release_question(text) == "where is <pt>1.250 0.500 0.750</pt>? next to the box"
    )


def test_point_rows_are_the_releases_whatever_its_draw(cases):
    """The release's rows are the sort indices of its draw: a permutation of 0..P-1 (two seeds,
    two orders, one set), which is what `release_points` takes (in file order)."""
    orders = {}
    for case in cases["points"]:
        n, p, rows = case["n"], case["num_points"], case["rows"]
        keep = preprocess.release_points(n, p)
        real = sorted(r for r in rows if r >= 0)
        if n > p:
            assert real == list(range(p)) and keep.tolist() == real
            orders.setdefault((case["scene_id"], n), set()).add(tuple(rows))
        else:
            assert keep is None and real == list(range(n)) and rows.count(-1) == p - n
    assert any(len(o) > 1 for o in orders.values())  # the draw changes the order only


def test_distinct_answers_are_the_releases_rows(cases):
    for case in cases["answers"] + [
        {"answers": r["answers"], "rows": r["release_answers"]} for r in cases["records"]
    ]:
        assert preprocess.distinct_answers(case["answers"]) == case["rows"]


def _check_row(row, meta, env, cases, answer=None):
    _, _, scenes, records, encoder = env
    record, scene = records[meta["id"]], scenes[meta["scene_id"]]
    assert meta["prompt"] == record["release_prompt"]
    want = encoder.prompt(record["release_prompt"], SHAPES["prompt_len"])
    np.testing.assert_array_equal(row["prompt_ids"][row["prompt_mask"]], want)
    # Points: the release's rows of this scene (as a set; padding zero) and no mask at all.
    (case,) = [c for c in cases["points"] if c["scene_id"] == meta["scene_id"] and c["seed"] == 0]
    assert case["n"] == len(scene["features"])
    real = sorted(r for r in case["rows"] if r >= 0)
    assert row["point_mask"].all()
    np.testing.assert_array_equal(row["features"][: len(real)], scene["features"][real])
    np.testing.assert_array_equal(row["voxels"][: len(real)], scene["voxels"][real])
    assert not row["features"][len(real) :].any() and not row["voxels"][len(real) :].any()
    if answer is not None:
        ids = encoder.answer(answer, SHAPES["answer_len"])
        np.testing.assert_array_equal(row["answer_ids"][row["answer_mask"]], ids)


def test_train_rows_one_per_distinct_answer_with_release_inputs(env, cases):
    out, _, _, records, encoder = env
    join = SceneJoin.open(out, "scanqa", "train")
    ids = [language_record(join.language[i])["id"] for i in range(len(join))]
    want = Counter((i, a) for i in ids for a in records[i]["release_answers"])
    rows = _rows(_iterator(env, profile="release"), sum(want.values()))  # one epoch
    got = Counter()
    for row, meta in rows:
        answers = records[meta["id"]]["release_answers"]
        (answer,) = [
            a
            for a in answers
            if np.array_equal(
                row["answer_ids"][row["answer_mask"]], encoder.answer(a, SHAPES["answer_len"])
            )
        ]
        got[(meta["id"], answer)] += 1
        _check_row(row, meta, env, cases, answer)
    assert got == want  # every distinct answer once per epoch, repeats dropped
    assert any(len(records[i]["release_answers"]) < len(records[i]["answers"]) for i, _ in want)


def test_two_hosts_split_the_release_rows(env):
    out = env[0]
    join = SceneJoin.open(out, "scanqa", "train")
    rows = [data.pipeline.answer_rows(join, range(h, len(join), 2)) for h in (0, 1)]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == data.pipeline.answer_rows(join, range(len(join)))


def test_eval_rows_take_release_inputs_and_the_first_answer(env, cases):
    out, _, _, records, _ = env
    n = len(SceneJoin.open(out, "scanqa", "validation"))
    it = _iterator(env, train=False, profile="release")
    for row, meta in _rows(it, n):
        _check_row(row, meta, env, cases, records[meta["id"]]["answers"][0])


def test_default_profile_is_unchanged_on_the_same_data(env):
    it = _iterator(env)
    for row, meta in _rows(it, 8):
        assert meta["prompt"].startswith("Question: ") and meta["prompt"].endswith(" Answer:")
        assert row["point_mask"].sum() == min(
            SHAPES["num_points"], len(env[2][meta["scene_id"]]["features"])
        )


def test_unknown_profile_is_refused(env):
    with pytest.raises(ValueError, match="profile 'lavis' is not one of"):
        _iterator(env, profile="lavis")
