"""grain pipeline: batch contract, location tokens, determinism, host slicing, exact resume, mixture."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import jax
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_tfds_fixtures import write_fixture  # noqa: E402

from data_pipeline.tfds import build  # noqa: E402
from llm3d_jax import data, tokens  # noqa: E402
from llm3d_jax.data.sources import SceneJoin  # noqa: E402
from llm3d_jax.fileio import write_jsonl_atomic  # noqa: E402

SHAPES = dict(num_points=48, prompt_len=16, answer_len=12)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipe"))
    features_dir, records, scenes, rows = write_fixture(root, num_scenes=6, records_per_scene=4)
    out = os.path.join(root, "tfds")
    build(features_dir, records, out, "synthetic", val_fraction=0.34, seed=0)
    # The same scenes as a second config, to test the mixture.
    scanqa = os.path.join(root, "scanqa.jsonl")
    write_jsonl_atomic(scanqa, [{**r, "id": "qa-" + r["id"], "source": "scanqa"} for r in rows])
    build(features_dir, scanqa, out, "scanqa", val_fraction=0.34, seed=0)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in rows] + ["a the of room object"]
    tok_dir = os.path.join(root, "tok")
    tokens.train_tokenizer(texts, vocab_size=400, out_dir=tok_dir)
    return out, tok_dir, scenes, {r["id"]: r for r in rows}


def _train(env, **kw):
    out, tok_dir, _, _ = env
    return data.make_train_iterator(
        out, tok_dir, batch_size=kw.pop("batch_size", 4), read_threads=2, **{**SHAPES, **kw}
    )


def _eval(env, **kw):
    out, tok_dir, _, _ = env
    return data.make_eval_iterator(
        out, tok_dir, batch_size=kw.pop("batch_size", 4), read_threads=2, **{**SHAPES, **kw}
    )


def _take(it, n):
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((jax.tree.map(np.asarray, batch), list(it.last_metadata)))
    return out


def _same(a, b):
    for (xa, ma), (xb, mb) in zip(a, b, strict=True):
        assert ma == mb
        for k in xa:
            np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_batch_contract_and_location_tokens(env):
    _, _, scenes, records = env
    it = _train(env)
    ((batch, meta),) = _take(it, 1)
    b, (n, lp, la) = 4, SHAPES.values()
    assert set(batch) == set(data.preprocess.MODEL_KEYS)
    # float16 by default: the stored precision, no conversion on the host
    assert batch["features"].shape == (b, n, 16) and batch["features"].dtype == np.float16
    assert batch["voxels"].shape == (b, n, 3) and batch["voxels"].dtype == np.int32
    assert batch["point_mask"].dtype == bool and batch["prompt_ids"].shape == (b, lp)
    assert batch["answer_ids"].shape == (b, la) and batch["answer_ids"].dtype == np.int32
    for row, m in enumerate(meta):
        rec, scene = records[m["id"]], scenes[m["scene_id"]]
        ans = batch["answer_ids"][row][batch["answer_mask"][row]]
        assert ans[-1] == 1  # eos
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row]]
        assert prompt[-1] == 1  # the tokenizer's own trailing </s>
        # Points: a real subset/padding of the scene's rows with their voxels.
        valid = batch["point_mask"][row]
        assert valid.sum() == min(n, len(scene["points"]))
        stored = {tuple(v) for v in scene["voxels"].astype(np.int32)}
        assert all(tuple(v) in stored for v in batch["voxels"][row][valid])
        assert not batch["features"][row][~valid].any()
        if rec["task"] == "grounding":
            locs = ans[(ans >= it.loc_offset)] - it.loc_offset
            assert len(locs) == 6
            text = "".join(tokens.location_token(i) for i in locs)
            back = tokens.parse_boxes(
                tokens.tokens_to_placeholders(text, m["grid_origin"], m["grid_voxel"])
            )
            want = tokens.parse_boxes(rec["answers"][0])
            np.testing.assert_array_less(np.abs(back - want), m["grid_voxel"] / 2 + 2e-3)


def test_eval_covers_split_with_padding_and_boxes(env):
    out, _, _, records = env
    n = len(SceneJoin.open(out, "synthetic", "validation"))
    it = _eval(env, batch_size=3)
    rows = _take(it, -(-n // 3))
    with pytest.raises(StopIteration):
        next(it)
    metas = [m for _, ms in rows for m in ms]
    valid = [m for m in metas if m["valid"]]
    assert len(valid) == n and len({m["id"] for m in valid}) == n
    for x, ms in rows:
        for r, m in enumerate(ms):
            assert x["answer_mask"][r].any() == m["valid"]  # padding rows carry no answer
    boxes = 0
    for x, ms in rows:
        for r, m in enumerate(ms):
            if m["valid"] and records[m["id"]]["task"] == "grounding":
                ids = x["answer_ids"][r]
                locs = ids[ids >= it.loc_offset] - it.loc_offset
                assert len(locs) == 6
                boxes += 1
    assert boxes > 0


def test_determinism_per_seed(env):
    _same(_take(_train(env, seed=3), 3), _take(_train(env, seed=3), 3))
    a, b = _take(_train(env, seed=3), 3), _take(_train(env, seed=4), 3)
    assert [m["id"] for _, ms in a for m in ms] != [m["id"] for _, ms in b for m in ms]


def test_two_hosts_disjoint_and_cover_the_epoch(env):
    out, _, _, _ = env
    n = len(SceneJoin.open(out, "synthetic", "train"))
    ids = []
    for host in (0, 1):
        it = _train(env, batch_size=2, process_index=host, process_count=2)
        per_host = len(range(host, n, 2))  # host batch 1: one epoch of the host's slice
        ids.append([m["id"] for _, ms in _take(it, per_host) for m in ms])
    assert len(set(ids[0])) == len(ids[0]) and len(set(ids[1])) == len(ids[1])
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == n
    # Eval: same number of batches on both hosts, valid rows disjoint and covering.
    n_val = len(SceneJoin.open(out, "synthetic", "validation"))
    seen, counts = [], []
    for host in (0, 1):
        batches = list(_eval(env, batch_size=4, process_index=host, process_count=2))
        counts.append(len(batches))
        it = _eval(env, batch_size=4, process_index=host, process_count=2)
        seen += [m["id"] for _, ms in _take(it, counts[-1]) for m in ms if m["valid"]]
    assert counts[0] == counts[1] and len(seen) == len(set(seen)) == n_val


def test_state_restore_resumes_exact_stream(env):
    it = _train(env, seed=7)
    _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = _take(it, 3)
    fresh = _train(env, seed=7)
    fresh.set_state(state)
    _same(expected, _take(fresh, 3))
    fresh.reset()
    _same(_take(_train(env, seed=7), 1), _take(fresh, 1))


def test_worker_processes_give_the_same_stream_and_resume(env):
    """`worker_count` grain processes do the per-example work: the batches of the threads-only
    iterator, in order, and a saved state resumes them."""
    want = _take(_train(env, seed=7), 4)
    it = _train(env, seed=7, worker_count=2)
    got = _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, as the checkpoint stores it
    got += _take(it, 2)
    _same(want, got)
    it.set_state(state)
    _same(want[2:], _take(it, 2))


def test_mixture_weights(env):
    it = _train(env, datasets="synthetic:3,scanqa:1", batch_size=8)
    counts = Counter(m["dataset"] for _, ms in _take(it, 10) for m in ms)
    assert counts["synthetic"] + counts["scanqa"] == 80
    assert 0.6 <= counts["synthetic"] / 80 <= 0.9
    assert all(
        m["id"].startswith("qa-") == (m["dataset"] == "scanqa")
        for _, ms in _take(it, 2)
        for m in ms
    )


def test_templates_and_override(env):
    ((_, metas),) = _take(_eval(env, batch_size=8), 1)
    qa = [m for m in metas if m["task"] == "qa" and m["valid"]]
    assert qa and all(
        m["prompt"].startswith("Question: ") and m["prompt"].endswith(" Answer:") for m in qa
    )
    ((_, metas),) = _take(_eval(env, batch_size=8, prompt_templates={"qa": "Q {prompt} A"}), 1)
    assert all(m["prompt"].startswith("Q ") for m in metas if m["task"] == "qa")


def test_global_arrays_on_mesh_and_bfloat16(env):
    out, tok_dir, _, _ = env
    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
    it = data.make_train_iterator(
        out, tok_dir, mesh, batch_size=8, features_dtype="bfloat16", read_threads=2, **SHAPES
    )
    batch = next(it)
    host = _take(_train(env, batch_size=8, features_dtype="bfloat16"), 1)[0][0]
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape[0] == 8
        assert v.sharding.spec[0] == ("data", "fsdp") and len(v.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(v), host[k])
    assert batch["features"].dtype == ml_dtypes.bfloat16
    # float16: the stored values, unconverted; float32 holds exactly the same numbers.
    half = _take(_train(env, batch_size=8, features_dtype="float16"), 1)[0][0]["features"]
    full = _take(_train(env, batch_size=8, features_dtype="float32"), 1)[0][0]["features"]
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half.astype(np.float32), full)


def test_bad_arguments(env):
    out, tok_dir, _, _ = env
    with pytest.raises(ValueError, match="not divisible by 2 processes"):
        _train(env, batch_size=3, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match="no TFDS dataset llm3d_language/sqa3d"):
        _train(env, datasets="sqa3d")
    with pytest.raises(ValueError, match="weight > 0"):
        _train(env, datasets="synthetic:0")
    with pytest.raises(ValueError, match="no split 'test'"):
        _eval(env, split="test")


def test_state_through_orbax_grain_handler(env, tmp_path):
    """The iterator state saved and restored by orbax with grain's per-process handler (the way
    llm3d_jax.train.checkpoint stores it) resumes the same stream."""
    import grain
    import orbax.checkpoint as ocp

    from llm3d_jax.train.checkpoint import IteratorState

    it = _train(env, seed=5)
    _take(it, 2)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    manager.save(
        2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(IteratorState(it)))
    )
    manager.wait_until_finished()
    expected = _take(it, 2)
    fresh = _train(env, seed=5)
    manager.restore(
        2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(IteratorState(fresh)))
    )
    _same(expected, _take(fresh, 2))


def test_blind_batches_carry_no_3d_input(env):
    """The blind baseline sees the same prompts and answers, but zero features and voxels."""
    ((seen, meta_seen),) = _take(_eval(env, seed=1), 1)
    ((blind, meta_blind),) = _take(_eval(env, seed=1, blind=True), 1)
    assert meta_seen == meta_blind
    assert np.abs(seen["features"]).sum() > 0 and seen["voxels"].any()
    assert not np.asarray(blind["features"]).any() and not blind["voxels"].any()
    for k in ("point_mask", "prompt_ids", "prompt_mask", "answer_ids", "answer_mask"):
        np.testing.assert_array_equal(seen[k], blind[k], err_msg=k)
