"""Object roles (`LLM3DConfig.object_roles`): the points rated as the r-th object the prompt
names, the box of each role's rated region, and `RoleGeometry` tokens of those boxes after the
target tokens; role r learns from `point_target == r + 1`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm3d_jax.infer.decode import DecodeConfig
from llm3d_jax.infer.generate import generate
from llm3d_jax.model import llm3d
from llm3d_jax.train import step as step_lib
from tests.model.random_inputs import random_inputs

PREFIX_INPUTS = ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")


def _module(roles=3):
    config = llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1, object_roles=roles)
    return llm3d.LLM3D(config)


def test_object_roles_need_target_tokens_and_two_roles():
    with pytest.raises(ValueError, match="needs target_tokens"):
        llm3d.LLM3DConfig.tiny(object_roles=3)
    with pytest.raises(ValueError, match="2 or more"):
        llm3d.LLM3DConfig.tiny(target_tokens=4, object_roles=1)


def test_role_boxes_are_the_boxes_of_each_roles_rated_region():
    voxels = np.array(
        [[[10, 10, 10], [20, 12, 14], [200, 200, 5], [205, 190, 9], [100, 100, 100]]], np.int32
    )
    point_mask = np.array([[True, True, True, True, False]])
    roles = np.full((1, 5, 2), -5.0, np.float32)
    roles[0, :2, 0] = 3.0  # role 0: the first two points
    roles[0, 2:4, 1] = 2.0  # role 1: the next two
    roles[0, 4, :] = 9.0  # a masked point rated high counts for no role
    boxes = llm3d.role_boxes(jnp.asarray(roles), voxels, point_mask, threshold=0.0)
    np.testing.assert_array_equal(
        np.asarray(boxes)[0], [[10, 10, 10, 20, 12, 14], [200, 190, 5, 205, 200, 9]]
    )


def test_role_geometry_gives_one_token_per_role_pair_and_all_and_silences_absent_roles():
    geometry = llm3d.RoleGeometry(width=16)
    boxes = np.array(
        [
            [[10, 10, 0, 40, 40, 30], [100, 20, 0, 140, 60, 90], [0, 0, 0, 0, 0, 0]],
            [[10, 10, 0, 40, 40, 30], [100, 20, 0, 140, 60, 90], [50, 200, 0, 70, 230, 40]],
        ],
        np.int32,
    )
    presence = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    params = geometry.init(jax.random.key(0), boxes, presence)
    tokens = np.asarray(geometry.apply(params, boxes, presence))
    assert tokens.shape == (2, 3 + 3 + 1 + 3, 16)
    # row 0 has no third object: its role token, its two pairs and the all-pairs token are zero
    silent = [2, 4, 5, 6, 7, 8, 9]  # role 2; pairs (0, 2), (1, 2); all pairs; each role's turns
    np.testing.assert_array_equal(tokens[0, silent], 0.0)
    assert np.abs(tokens[0, [0, 1, 3]]).min(axis=-1).max() > 0
    # the same two objects give the same role and pair tokens in both rows
    np.testing.assert_allclose(tokens[0, [0, 1, 3]], tokens[1, [0, 1, 3]], rtol=1e-6)
    # swapping the roles changes the pair token: it knows which object is named first
    swapped = np.asarray(geometry.apply(params, boxes[:, [1, 0, 2]], presence))
    assert not np.allclose(swapped[1, 3], tokens[1, 3])


def test_rating_loss_sums_add_each_roles_cross_entropy():
    ratings = jnp.array([[0.5, -1.0, 2.0]])
    roles = jnp.array([[[1.0, -2.0], [0.0, 3.0], [-1.0, -1.0]]])  # [B,N,R]
    target = jnp.array([[1, 2, 0]], jnp.int8)  # point 0: first named, point 1: second
    point_mask = jnp.array([[True, True, True]])
    answer_mask = jnp.array([[True]])
    total, count = step_lib.rating_loss_sums(ratings, target, point_mask, answer_mask, roles)
    bce = optax.sigmoid_binary_cross_entropy
    expected = (
        bce(ratings, jnp.array([[1.0, 1.0, 0.0]])).sum()
        + bce(roles, jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])).sum()
    )
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(count) == 3.0


def test_role_ratings_learn_which_points_are_the_first_and_the_second_named_object():
    module = _module(roles=2)
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(module.config)
    x["point_target"] = np.zeros((2, 16), np.int8)
    x["point_target"][:, :4] = 1
    x["point_target"][:, 8:12] = 2
    tx = optax.adam(3e-3)
    state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    train_step = jax.jit(step_lib.make_train_step(module, tx, lambda s: 3e-3, 1))
    for _ in range(30):
        state, metrics = train_step(state, {}, x, jax.random.key(0))
    inputs = {k: x[k] for k in PREFIX_INPUTS}
    _, inter = module.apply(
        {"params": state.params}, **inputs, method=llm3d.LLM3D.prefix, mutable="intermediates"
    )
    roles = np.asarray(inter["intermediates"]["role_ratings"][0])  # [B,N,2]
    assert roles[:, :4, 0].min() > roles[:, 4:, 0].max()
    assert roles[:, 8:12, 1].min() > np.delete(roles[:, :, 1], np.s_[8:12], axis=1).max()


def test_prefix_and_generation_carry_the_geometry_tokens():
    module = _module()
    c = module.config
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(c)
    inputs = {k: x[k] for k in PREFIX_INPUTS}
    embeds, mask = module.apply({"params": params}, **inputs, method=llm3d.LLM3D.prefix)
    scene = c.qformer.num_query_tokens + c.target_tokens + 6 + (3 + 3 + 1 + 3)
    assert embeds.shape[1] == scene + x["prompt_ids"].shape[1] and np.asarray(mask).all()
    # the geometry tokens follow the points: moving the points moves them
    moved = dict(inputs, voxels=(x["voxels"] + 17) % 256)
    embeds2, _ = module.apply({"params": params}, **moved, method=llm3d.LLM3D.prefix)
    geometry = slice(scene - 10, scene)
    assert not np.allclose(np.asarray(embeds)[:, geometry], np.asarray(embeds2)[:, geometry])
    config = DecodeConfig(max_new_tokens=6, loc_offset=c.llm.loc_offset, loc_bins=256)
    ids, _ = generate(module, params, inputs, config)
    assert ids.shape == (2, 6)


def test_a_grounding_model_grows_object_roles_and_keeps_the_rest():
    small = _module(roles=0)
    params = llm3d.init_params(small, seed=0)
    grown = _module(roles=3)
    new_params, new = llm3d.grow_params(grown, params, seed=1)
    assert new and all(p.startswith(("relevance/role_", "role_geometry/")) for p in new), new
    np.testing.assert_array_equal(
        new_params["relevance"]["match"]["kernel"], params["relevance"]["match"]["kernel"]
    )
    assert llm3d.grounding_settings(small.config) != llm3d.grounding_settings(grown.config)


def test_taught_rows_take_each_roles_true_box_and_the_others_keep_the_rated_ones():
    voxels = np.array([[[10, 10, 10], [20, 12, 14], [200, 200, 5], [205, 190, 9]]] * 2, np.int32)
    point_mask = np.ones((2, 4), bool)
    target = np.array([[1, 1, 2, 0], [-1, -1, -1, -1]], np.int32)  # row 1: not taught
    rated = np.full((2, 3, 6), 7, np.int32)
    presence = np.full((2, 3), 0.3, np.float32)
    boxes, shown = llm3d.taught_roles(target, voxels, point_mask, rated, presence)
    boxes, shown = np.asarray(boxes), np.asarray(shown)
    np.testing.assert_array_equal(boxes[0, 0], [10, 10, 10, 20, 12, 14])
    np.testing.assert_array_equal(boxes[0, 1], [200, 200, 5, 200, 200, 5])
    # a role the question does not fill keeps its rated box (an empty box has no size), silenced
    np.testing.assert_array_equal(boxes[0, 2], rated[0, 2])
    np.testing.assert_array_equal(shown[0], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(boxes[1], rated[1])
    np.testing.assert_array_equal(shown[1], presence[1])


def test_the_role_teacher_shows_true_boxes_in_training_only():
    """With role_teacher 1 the train step shows the LLM the true role boxes: its gradient
    differs from the rated boxes' step; the loss stays finite where a role has no points."""
    module = _module()
    params = llm3d.init_params(module, seed=0, points=16)
    x = random_inputs(module.config)
    x["point_target"] = np.zeros((2, 16), np.int8)
    x["point_target"][:, :4] = 1
    x["point_target"][0, 8:12] = 2  # row 1 names one object: roles 1 and 2 are empty
    tx = optax.sgd(1e-3)
    state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

    def updated(teacher):
        train_step = step_lib.make_train_step(module, tx, lambda s: 1e-3, 1, role_teacher=teacher)
        new, metrics = jax.jit(train_step)(state, {}, x, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
        return new.params["role_geometry"]["role_out"]["kernel"]

    assert not np.allclose(updated(1.0), updated(0.0))
