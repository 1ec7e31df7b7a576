"""The device scene cache (`data.scene_cache = "device"`): the batches the train step gathers equal
the host path's bit for bit, the cache is split over the mesh as llm3d_jax/data/scene_cache.py
says, resume and the host-RAM fallback, and a train step gives the host path's loss."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "data_pipeline"))
sys.path.insert(0, os.path.join(TESTS, "train"))
from test_tfds_fixtures import write_fixture  # noqa: E402

from data_pipeline.tfds import build  # noqa: E402
from llm3d_jax import data, tokens  # noqa: E402
from llm3d_jax.data import preprocess, scene_cache  # noqa: E402
from llm3d_jax.train import sharding  # noqa: E402

# Feature width 12 on 8 devices: the columns are padded to 16, 2 per device. The train split's
# scenes hold 54, 61, 68 and 75 points: two are padded to 64, two sampled.
DIM = 12
SHAPES = dict(num_points=64, prompt_len=16, answer_len=12)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    features_dir, records, _, rows = write_fixture(root, num_scenes=6, records_per_scene=4, dim=DIM)
    out = os.path.join(root, "tfds")
    build(features_dir, records, out, "synthetic", val_fraction=0.34, seed=0)
    texts = [r["prompt"] + " " + " ".join(r["answers"]) for r in rows] + ["a the of room object"]
    tok_dir = os.path.join(root, "tok")
    tokens.train_tokenizer(texts, vocab_size=400, out_dir=tok_dir)
    return out, tok_dir


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((4, 2, 1))


def _iterator(env, mesh, **kw):
    out, tok_dir = env
    options = dict(batch_size=8, seed=3, read_threads=2, **SHAPES)
    return data.make_train_iterator(out, tok_dir, mesh, **{**options, **kw})


def _gathered(it, batch, mesh):
    """The model's batch the train step sees: the cached layout gathered inside jit."""
    spec = it.scene_cache.spec
    gather = jax.jit(lambda arrays, b: scene_cache.model_batch(arrays, b, spec))
    with jax.set_mesh(mesh):
        return {k: np.asarray(v) for k, v in gather(it.scene_cache.arrays, batch).items()}


def _assert_bits_equal(want: dict, got: dict):
    assert set(got) == set(want) == set(preprocess.MODEL_KEYS)
    for k, w in want.items():
        w, g = np.asarray(w), np.asarray(got[k])
        assert g.dtype == w.dtype and g.shape == w.shape, k
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=k)


def test_sampler_draws_the_same_rows_on_host_and_device():
    """`preprocess.choose_points` (numpy) and `scene_cache.sample_rows` (jax) take the same rows
    for the same key, and the subsets are uniform over the scene's rows."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**32, (400, 2), dtype=np.uint32)
    counts = rng.choice([5, 64, 65, 300], len(keys)).astype(np.int32)
    spec = scene_cache.CacheSpec(None, (), 1, DIM, 300, 64, "ours", False)
    rows, valid = jax.jit(lambda k, n: scene_cache.sample_rows(k, n, spec))(keys, counts)
    for key, n, r, v in zip(keys, counts, np.asarray(rows), np.asarray(valid)):
        keep = preprocess.choose_points(int(n), 64, key)
        if keep is None:  # all rows, then padding
            np.testing.assert_array_equal(v, np.arange(64) < n)
            np.testing.assert_array_equal(r[v], np.arange(min(n, 64)))
        else:
            assert v.all()
            np.testing.assert_array_equal(r, keep)
    # Uniform: each of 300 rows is taken with probability 64/300 (binomial, 5 sigma).
    taken = np.zeros(300)
    for key in rng.integers(0, 2**32, (3000, 2), dtype=np.uint32):
        taken[preprocess.choose_points(300, 64, key)] += 1
    p = 64 / 300
    assert np.abs(taken - 3000 * p).max() < 5 * np.sqrt(3000 * p * (1 - p))
    # The release profile: the first P rows, whatever the key.
    release = scene_cache.CacheSpec(None, (), 1, DIM, 300, 64, "release", False)
    rows, valid = scene_cache.sample_rows(keys[:3], np.array([300, 65, 5], np.int32), release)
    np.testing.assert_array_equal(rows, np.broadcast_to(np.arange(64), (3, 64)))
    np.testing.assert_array_equal(valid[2], np.arange(64) < 5)
    assert preprocess.release_points(300, 64).tolist() == list(range(64))


@pytest.mark.parametrize(
    "options",
    [
        dict(features_dtype="bfloat16"),
        dict(profile="release", features_dtype="float16"),
        dict(blind=True, features_dtype="float32"),
    ],
    ids=["ours-bf16", "release-fp16", "blind-fp32"],
)
def test_cached_batches_equal_the_host_paths_bit_for_bit(env, mesh, options):
    host = _iterator(env, mesh, **options)
    cached = _iterator(env, mesh, scene_cache="device", **options)
    assert host.scene_cache is None and cached.scene_cache is not None
    counts, targets = set(), 0
    for _ in range(3):
        want, batch = next(host), next(cached)
        assert set(batch) == set(preprocess.CACHED_KEYS)
        assert cached.last_metadata == host.last_metadata
        _assert_bits_equal(want, _gathered(cached, batch, mesh))
        counts |= {int(n) for n in np.asarray(want["point_mask"]).sum(1)}
        targets += int(np.asarray(want["point_target"]).sum())
    assert targets > 0  # the records' objects were found among the points
    if options.get("profile") != "release":  # both branches of the sampler were taken
        assert counts >= {54, 61, 64}
    # Per example the cache moves the text, the scene index, key and object mask only.
    assert cached.sent_bytes < host.sent_bytes / 5


def test_cache_is_split_over_the_batch_axes_as_stated(env, mesh):
    it = _iterator(env, mesh, scene_cache="device", features_dtype="bfloat16")
    arrays, spec = it.scene_cache.arrays, it.scene_cache.spec
    total = 54 + 61 + 68 + 75
    assert spec.shards == 8 and spec.axes == ("data", "fsdp") and spec.max_points == 75
    features = arrays["features"]
    assert features.shape == (total, 16) and features.dtype == jax.numpy.bfloat16
    assert features.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
    shards = features.addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(total, 2)}
    columns = sorted(s.index[1].start for s in shards)
    assert columns == list(range(0, 16, 2))  # every device a different block of columns
    full = np.asarray(features)
    assert not full[:, DIM:].any()  # the padding columns
    for name in ("voxels", "slots", "starts", "counts"):
        assert arrays[name].sharding.is_fully_replicated, name
    assert it.scene_cache.per_device_bytes == total * 2 * 2 + total * (3 + 4) + 4 * 2 * 4


def test_resume_with_the_cache_continues_the_stream(env, mesh):
    it = _iterator(env, mesh, scene_cache="device", seed=7)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [(next(it), list(it.last_metadata)) for _ in range(2)]
    fresh = _iterator(env, mesh, scene_cache="device", seed=7)
    fresh.set_state(state)
    for batch, meta in expected:
        again = next(fresh)
        assert fresh.last_metadata == meta
        _assert_bits_equal(_gathered(it, batch, mesh), _gathered(fresh, again, mesh))


def test_over_the_budget_the_scenes_stay_in_host_ram(env, mesh, capsys):
    host = _iterator(env, mesh, features_dtype="bfloat16")
    ram = _iterator(
        env, mesh, scene_cache="device", scene_cache_budget_gb=1e-6, features_dtype="bfloat16"
    )
    assert ram.scene_cache is None
    assert "kept in host RAM" in capsys.readouterr().out
    for _ in range(2):
        want, got = next(host), next(ram)
        assert ram.last_metadata == host.last_metadata
        _assert_bits_equal(
            {k: np.asarray(v) for k, v in want.items()}, {k: np.asarray(v) for k, v in got.items()}
        )


def test_a_train_step_with_the_cache_gives_the_host_paths_loss(env, mesh):
    """`setup.compile_train_step` with the cache (the points gathered inside the step, then two
    accumulated microbatches) against the host path's batch: the same loss, gradient norm and
    updated params. The stand-in model of tests/train (compiles in seconds; train.py runs the
    real model on the cache in tests/train/test_train_cli.py)."""
    import ml_collections
    from standin import TRAINABLE, StandIn

    from llm3d_jax.train import optimizer, setup
    from llm3d_jax.train import state as state_lib
    from llm3d_jax.train import step as step_lib

    host = _iterator(env, mesh, features_dtype="bfloat16")
    cached = _iterator(env, mesh, features_dtype="bfloat16", scene_cache="device")
    module = StandIn(vocab=host.loc_offset, loc_bins=256)
    first = next(_iterator(env, None, features_dtype="bfloat16"))
    example = {k: first[k][:1] for k in step_lib.MODEL_INPUTS}
    init_fn = lambda rng: module.init(rng, **example, deterministic=True)["params"]
    boxed = state_lib.abstract_params(init_fn)
    trainable_abs, frozen_abs, trainable_sh, frozen_sh = state_lib.param_shardings(
        boxed, mesh, TRAINABLE
    )
    schedule = optimizer.make_schedule(lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=10)
    tx = optimizer.make_optimizer(
        trainable_abs, schedule, b1=0.9, b2=0.999, weight_decay=0.05, grad_clip=1.0
    )
    state_sh = state_lib.state_shardings(tx, trainable_abs, trainable_sh, mesh)
    training = setup.Training(
        module, TRAINABLE, init_fn, schedule, tx, trainable_abs, frozen_abs, state_sh, frozen_sh
    )
    config = ml_collections.ConfigDict({"microbatches": 2})
    with jax.set_mesh(mesh):
        state, frozen = state_lib.init_random(
            init_fn, tx, TRAINABLE, state_sh, frozen_sh, jax.random.key(0)
        )
        results = []
        for it in (host, cached):
            batch = next(it)
            batch_abs = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch
            )
            scenes = it.scene_cache
            step = setup.compile_train_step(config, mesh, training, batch_abs, frozen, scenes)
            extra = () if scenes is None else (scenes.arrays,)
            fresh = jax.tree.map(lambda x: x.copy(), state)  # the step donates its state
            new, metrics = step(fresh, frozen, batch, jax.random.key(1), *extra)
            results.append(jax.device_get((new.params, metrics)))
    (params_host, metrics_host), (params_cached, metrics_cached) = results
    assert metrics_cached == metrics_host and metrics_host["answer_tokens"] > 0
    jax.tree.map(np.testing.assert_array_equal, params_cached, params_host)
