"""Target tokens (`LLM3DConfig.target_tokens`): the points rated as the object the prompt names,
and the six location tokens of their box, follow the scene tokens; the ratings learn from a
per-point loss against the points of the record's objects (`point_target`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm3d_jax.data import preprocess
from llm3d_jax.infer.decode import DecodeConfig
from llm3d_jax.infer.generate import generate
from llm3d_jax.model import llm3d
from llm3d_jax.train import step as step_lib
from tests.model.random_inputs import random_inputs


def _module(**overrides):
    config = llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1, **overrides)
    return llm3d.LLM3D(config)


def test_extent_ids_are_the_box_of_the_points_rated_positive():
    module = _module()
    llm = module.config.llm
    voxels = np.array([[[10, 20, 30], [200, 5, 7], [50, 60, 70], [0, 255, 1]]], np.int32)
    point_mask = np.array([[True, True, True, False]])
    rating = np.array([[2.0, -1.0, 0.5, 9.0]], np.float32)  # the masked point is ignored
    ids = llm3d.extent_ids(jnp.asarray(rating), voxels, point_mask, llm)
    box = np.array([10, 20, 30, 50, 60, 70]) * llm.loc_bins // 256
    np.testing.assert_array_equal(np.asarray(ids)[0], llm.loc_offset + box)
    # none rated positive: the box of the best-rated real point
    ids = llm3d.extent_ids(jnp.asarray(rating - 10.0), voxels, point_mask, llm)
    box = np.array([10, 20, 30, 10, 20, 30]) * llm.loc_bins // 256
    np.testing.assert_array_equal(np.asarray(ids)[0], llm.loc_offset + box)


def test_scene_tokens_add_target_and_extent_tokens_and_depend_on_the_prompt():
    module = _module()
    c = module.config
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(c)
    embeds, mask = module.apply(
        {"params": params},
        *(x[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")),
        method=llm3d.LLM3D.prefix,
    )
    scene = c.qformer.num_query_tokens + c.target_tokens + 6
    assert embeds.shape[1] == scene + x["prompt_ids"].shape[1]
    assert np.asarray(mask).all()
    other = dict(x, prompt_ids=(x["prompt_ids"] + 7) % 500)
    embeds2, _ = module.apply(
        {"params": params},
        *(other[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")),
        method=llm3d.LLM3D.prefix,
    )
    q = c.qformer.num_query_tokens
    np.testing.assert_array_equal(np.asarray(embeds)[:, :q], np.asarray(embeds2)[:, :q])
    assert not np.allclose(np.asarray(embeds)[:, q:scene], np.asarray(embeds2)[:, q:scene])
    # The six extent tokens: the location rows of the rated region's box plus one learned vector
    # per slot (x, y, z minima, then maxima).
    x_in = {k: x[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")}
    _, inter = module.apply(
        {"params": params}, **x_in, method=llm3d.LLM3D.prefix, mutable="intermediates"
    )
    rating = inter["intermediates"]["point_ratings"][0]
    ids = llm3d.extent_ids(rating, x["voxels"], x["point_mask"], c.llm, region=True)
    rows = module.apply({"params": params}, ids, method=lambda m, i: m.llm.embed(i))
    np.testing.assert_allclose(
        np.asarray(embeds)[:, scene - 6 : scene],
        np.asarray(rows) + np.asarray(params["extent_slots"]),
        atol=1e-6,
    )


def test_generation_runs_with_target_tokens():
    module = _module()
    c = module.config
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(c)
    inputs = {k: x[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")}
    dc = DecodeConfig(max_new_tokens=8, loc_offset=c.llm.loc_offset, loc_bins=c.llm.loc_bins)
    ids, _ = generate(module, params, inputs, dc)
    assert ids.shape == (2, 8)


def test_the_rating_loss_trains_the_ratings_towards_the_target_points():
    """The train step adds the per-point loss when the batch has `point_target`; a few steps on
    one batch lower it, and it is reported as `rating_loss`."""
    module = _module()
    c = module.config
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(c)
    x["point_target"] = np.zeros((2, 16), bool)
    x["point_target"][:, :5] = True
    tx = optax.adam(3e-3)
    state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    train_step = jax.jit(step_lib.make_train_step(module, tx, lambda s: 3e-3, 1))
    losses = []
    for _ in range(15):
        state, metrics = train_step(state, {}, x, jax.random.key(0))
        losses.append(float(metrics["rating_loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    without = {k: v for k, v in x.items() if k != "point_target"}
    _, metrics = train_step(state, {}, without, jax.random.key(0))
    assert "rating_loss" not in metrics


def test_rating_loss_sums_count_real_points_of_answered_rows():
    ratings = jnp.array([[0.0, 3.0, -2.0], [1.0, 1.0, 1.0]])
    target = jnp.array([[True, True, False], [True, False, True]])
    point_mask = jnp.array([[True, True, False], [True, True, True]])
    answer_mask = jnp.array([[True, False], [False, False]])  # row 1: eval padding
    total, count = step_lib.rating_loss_sums(ratings, target, point_mask, answer_mask)
    expected = optax.sigmoid_binary_cross_entropy(ratings[0, :2], jnp.ones(2)).sum()
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(count) == 2.0


def test_target_points_follow_the_chosen_points_and_padding():
    scene = {"instance": np.array([-1, 3, 3, 7, 2], np.int32)}
    keep = np.array([1, 3, 4])
    # k: the point's object is the k-th the record names
    np.testing.assert_array_equal(preprocess.target_points(scene, keep, [3, 2], 3), [1, 0, 2])
    np.testing.assert_array_equal(preprocess.target_points(scene, keep, [2, 3], 3), [2, 0, 1])
    np.testing.assert_array_equal(
        preprocess.target_points(scene, None, [7], 7), [0, 0, 0, 1, 0, 0, 0]
    )
    assert not preprocess.target_points(scene, None, [], 5).any()


def test_a_pretrained_model_grows_target_tokens():
    small = llm3d.LLM3D(llm3d.LLM3DConfig.tiny())
    params = llm3d.init_params(small, seed=0)
    grown = _module()
    new_params, new = llm3d.grow_params(grown, params, seed=1)
    assert new and all(p.startswith(("relevance/", "target_proj/", "extent_slots")) for p in new), (
        new
    )
    np.testing.assert_array_equal(new_params["proj"]["kernel"], params["proj"]["kernel"])
    assert llm3d.grounding_settings(small.config) != llm3d.grounding_settings(grown.config)


def test_rated_region_keeps_the_best_points_neighbours_and_drops_a_stray_point():
    # a chain 0-1-2 (each link within 16 voxels), a positive stray point 3 across the room, a
    # negative point 4 next to the chain, a masked point 5
    voxels = np.array(
        [[[10, 10, 10], [20, 10, 10], [30, 12, 10], [200, 200, 10], [15, 15, 10], [11, 10, 10]]],
        np.int32,
    )
    rating = np.array([[3.0, 0.5, 0.2, 1.0, -2.0, 9.0]], np.float32)
    point_mask = np.array([[True] * 5 + [False]])
    region = np.asarray(llm3d.rated_region(jnp.asarray(rating), voxels, point_mask))
    np.testing.assert_array_equal(region[0], [True, True, True, False, False, False])
    module = _module()
    llm = module.config.llm
    ids = llm3d.extent_ids(jnp.asarray(rating), voxels, point_mask, llm, region=True)
    box = np.array([10, 10, 10, 30, 12, 10]) * llm.loc_bins // 256
    np.testing.assert_array_equal(np.asarray(ids)[0], llm.loc_offset + box)
    # nothing rated positive: the best-rated real point alone
    low = np.asarray(llm3d.rated_region(jnp.asarray(rating - 10.0), voxels, point_mask))
    np.testing.assert_array_equal(low[0], [True, False, False, False, False, False])
    # a lower threshold takes in the rim point rated -2 (the box grows to it), not the stray
    # point, which is out of reach
    wide = np.asarray(llm3d.rated_region(jnp.asarray(rating), voxels, point_mask, threshold=-2.5))
    np.testing.assert_array_equal(wide[0], [True, True, True, False, True, False])
    ids = llm3d.extent_ids(
        jnp.asarray(rating - 1.0), voxels, point_mask, llm, region=True, threshold=-1.5
    )
    np.testing.assert_array_equal(np.asarray(ids)[0], llm.loc_offset + box)


def test_the_models_target_threshold_sets_the_box_it_is_shown():
    """LLM3DConfig.target_threshold reaches the extent tokens: with every rating between the two
    thresholds, the box is the best point's alone at 100 and a wider region at -100, and only the
    six extent tokens of the LLM input change."""
    c = llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1)
    x = random_inputs(c, batch=1, points=16)
    args = [x[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")]
    params = llm3d.init_params(llm3d.LLM3D(c), points=16)
    embeds, regions = [], []
    for threshold in (100.0, -100.0):
        module = llm3d.LLM3D(dataclasses.replace(c, target_threshold=threshold))
        (prefix, _), state = module.apply(
            {"params": params}, *args, method=module.prefix, mutable="intermediates"
        )
        rating = state["intermediates"]["point_ratings"][0]
        assert -100 < float(jnp.min(rating)) and float(jnp.max(rating)) < 100
        regions.append(
            np.asarray(
                llm3d.rated_region(rating, x["voxels"], x["point_mask"], threshold=threshold)
            )
        )
        embeds.append(np.asarray(prefix))
    assert regions[0].sum() == 1 and regions[1].sum() > 1
    prompt_len = x["prompt_ids"].shape[1]
    extent = slice(-prompt_len - 6, -prompt_len)
    assert not np.allclose(embeds[0][:, extent], embeds[1][:, extent])
    np.testing.assert_array_equal(embeds[0][:, : -prompt_len - 6], embeds[1][:, : -prompt_len - 6])


def test_an_exported_model_keeps_its_negative_threshold(tmp_path):
    from llm3d_jax import loading
    from llm3d_jax.infer.exported import export

    module = llm3d.LLM3D(llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1))
    assert module.config.target_threshold == -1.0  # the default
    module = llm3d.LLM3D(dataclasses.replace(module.config, target_threshold=-1.5))
    export(str(tmp_path / "m"), module, llm3d.init_params(module), params_format="safetensors")
    loaded, _ = loading.load_llm3d(str(tmp_path / "m"))
    assert loaded.config.target_threshold == -1.5


def _ratings(module, params, x, prompt_ids):
    _, state = module.apply(
        {"params": params},
        *(x[k] for k in ("features", "voxels", "point_mask")),
        prompt_ids,
        x["prompt_mask"],
        method=llm3d.LLM3D.prefix,
        mutable="intermediates",
    )
    return np.asarray(state["intermediates"]["point_ratings"][0])


def test_context_makes_the_ratings_read_word_order():
    """Without `target_context` the ratings see the prompt as a bag of words (the direct match
    sums over them; the cross-attention has no positions): "chair closest to the table" rates
    the points as "table closest to the chair" does. With it, the words are read in order."""
    x = random_inputs(_module().config)
    swapped = x["prompt_ids"][:, ::-1]
    for context in (False, True):
        module = _module(target_context=context)
        params = llm3d.init_params(module, seed=0, points=16)
        assert ("prompt_layer" in params["relevance"]) == context
        same = np.allclose(
            _ratings(module, params, x, x["prompt_ids"]),
            _ratings(module, params, x, swapped),
            atol=1e-5,
        )
        assert same != context, context
    # a model trained without it grows the context layer and keeps the rest
    plain = llm3d.init_params(_module(), seed=0)
    grown, new = llm3d.grow_params(_module(target_context=True), plain, seed=1)
    assert new and all(p.startswith("relevance/prompt_") for p in new), new
    np.testing.assert_array_equal(
        grown["relevance"]["words"]["kernel"].shape, plain["relevance"]["words"]["kernel"].shape
    )


def test_every_grounding_param_has_a_sharding_under_the_rules_table():
    """Each param's logical axes resolve under train/sharding.RULES (a name used twice in one
    array, e.g. ("embed", "embed"), fails there, not in the unsharded tests above)."""
    from flax import linen as nn

    from llm3d_jax.train import sharding

    module = _module(target_context=True)
    inputs = llm3d.example_inputs(module.config, points=4)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))["params"]
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings = sharding.logical_shardings(boxed, mesh)
    assert "prompt_layer" in shardings["relevance"]
    assert len(jax.tree.leaves(shardings)) == len(jax.tree.leaves(nn.unbox(boxed)))
