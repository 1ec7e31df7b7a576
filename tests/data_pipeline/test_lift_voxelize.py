"""Voxelisation onto the 256^3 grid of the scene feature file."""

import numpy as np
import pytest

from data_pipeline.lift import LiftedPoints
from data_pipeline.lift.voxelize import balanced_sample, grid_for_bounds, voxel_indices, voxelize


def lifted_points(points, rows, table, instance=None, colors=None, weights=None):
    n = len(points)
    return LiftedPoints(
        points=np.asarray(points, np.float32),
        colors=np.zeros((n, 3), np.uint8) if colors is None else np.asarray(colors, np.uint8),
        instance=np.full(n, -1, np.int32) if instance is None else np.asarray(instance, np.int32),
        ref_point=np.arange(n, dtype=np.int32),
        ref_row=np.asarray(rows, np.int32),
        ref_weight=np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32),
        table=np.asarray(table, np.float32),
    )


def test_every_point_keeps_floor_of_its_offset_including_the_top_corner():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-1.3, 0.2, 0.0]), np.array([4.1, 3.0, 2.7])
    points = rng.uniform(lo, hi, size=(5000, 3)).astype(np.float32)
    points[0], points[1] = lo, hi  # the AABB corners
    table = np.eye(4, dtype=np.float32)
    out = voxelize(lifted_points(points, rng.integers(0, 4, 5000), table))
    origin, voxel = out["grid_origin"], out["grid_voxel"]
    assert origin.dtype == np.float32 and voxel.dtype == np.float32 and voxel.shape == ()
    np.testing.assert_array_equal(origin, lo.astype(np.float32))
    expected = np.floor((out["points"] - origin) / voxel)
    np.testing.assert_array_equal(out["voxels"], expected)
    assert out["voxels"].dtype == np.uint8 and out["voxels"].max() == 255
    assert len(np.unique(out["voxels"], axis=0)) == len(out["voxels"])  # one point per voxel
    assert abs(float(voxel) * 256 - float(np.max(hi - lo))) < 1e-5


def test_grid_guard_keeps_the_top_face_in_voxel_255():
    for extent in (1.0, 2.56, 5.12, 7.77, 0.3):
        origin, voxel = grid_for_bounds(np.zeros(3), np.full(3, extent))
        assert voxel_indices(np.full((1, 3), extent, np.float32), origin, voxel).max() == 255


def test_mean_feature_majority_instance_mean_colour_and_cap():
    table = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    points = [[0.001, 0, 0], [0.002, 0, 0], [0.003, 0, 0], [2.56, 2.56, 2.56]]
    out = voxelize(
        lifted_points(
            points,
            rows=[0, 1, 1, 2],
            table=table,
            instance=[4, 7, 7, 1],
            colors=[[0, 0, 0], [30, 60, 90], [60, 120, 180], [9, 9, 9]],
        )
    )
    assert len(out["points"]) == 2
    first = np.argmin(out["points"][:, 0])
    np.testing.assert_allclose(
        out["features"][first], np.array([1, 2, 0]) / np.sqrt(5), atol=1e-3
    )  # mean of rows 0, 1, 1, renormalised
    assert out["features"].dtype == np.float16
    assert out["instance"][first] == 7
    np.testing.assert_array_equal(out["colors"][first], [30, 60, 90])
    np.testing.assert_allclose(out["points"][first], [0.002, 0, 0], atol=1e-6)
    capped = voxelize(lifted_points(points, [0, 1, 1, 2], table), max_points=1)
    assert len(capped["points"]) == 1


def test_a_points_feature_is_its_confidence_weighted_mean():
    table = np.array([[1, 0], [0, 1]], np.float32)
    lifted = LiftedPoints(
        points=np.array([[0, 0, 0], [1, 1, 1]], np.float32),
        colors=np.zeros((2, 3), np.uint8),
        instance=np.array([-1, -1], np.int32),
        ref_point=np.array([0, 0, 1], np.int32),
        ref_row=np.array([0, 1, 1], np.int32),
        ref_weight=np.array([3e-20, 1e-20, 0.5], np.float32),  # tiny confidences still work
        table=table,
    )
    out = voxelize(lifted)
    np.testing.assert_allclose(out["features"][0], np.array([3, 1]) / np.sqrt(10), atol=1e-3)
    np.testing.assert_allclose(out["features"][1], [0, 1], atol=1e-3)


def test_points_outside_a_given_grid_are_rejected():
    lifted = lifted_points([[0, 0, 0], [3, 0, 0]], [0, 0], np.eye(2))
    with pytest.raises(ValueError, match="outside"):
        voxelize(lifted, origin=np.zeros(3), voxel=0.01)


def test_per_point_tables_take_the_sparse_path():
    """A table with one row per point (the neural field's) averages the same way."""
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 1, size=(5000, 3)).astype(np.float32)
    table = rng.normal(size=(5000, 8)).astype(np.float32)
    out = voxelize(lifted_points(points, np.arange(5000), table))
    idx = voxel_indices(points, out["grid_origin"], out["grid_voxel"])
    first = np.flatnonzero((idx == out["voxels"][0]).all(axis=1))
    want = table[first].mean(axis=0)
    np.testing.assert_allclose(out["features"][0], want / np.linalg.norm(want), atol=2e-3)


def test_balanced_sample_gives_each_owner_an_equal_share_and_passes_on_what_is_left():
    rng = np.random.default_rng(0)
    owner = np.repeat([0, 1, 2, 3], [1000, 80, 5, 300])  # background, then three objects
    keep = balanced_sample(owner, 200, rng)
    assert len(keep) == 200 and len(np.unique(keep)) == 200 and np.all(np.diff(keep) > 0)
    counts = np.bincount(owner[keep], minlength=4)
    # the 5-item object keeps all of its items; the other three split the rest evenly
    assert counts[2] == 5 and sorted(counts[[0, 1, 3]]) == [65, 65, 65]
    assert len(balanced_sample(owner, len(owner), rng)) == len(owner)
    np.testing.assert_array_equal(
        balanced_sample(owner, 200, np.random.default_rng(1)),
        balanced_sample(owner, 200, np.random.default_rng(1)),
    )


def test_balanced_cap_keeps_small_objects_that_a_uniform_cap_loses():
    rng = np.random.default_rng(0)
    floor = np.column_stack([rng.uniform(0, 5, 20000), rng.uniform(0, 5, 20000), np.zeros(20000)])
    cup = rng.uniform([2.0, 2.0, 0.5], [2.1, 2.1, 0.6], size=(300, 3))
    points = np.concatenate([floor, cup]).astype(np.float32)
    instance = np.concatenate([np.zeros(20000), np.full(300, 9)]).astype(np.int32)
    lifted = lifted_points(points, np.zeros(len(points)), np.eye(2), instance=instance)
    uniform = voxelize(lifted, max_points=400)
    balanced = voxelize(lifted, max_points=400, balance=True)
    assert len(uniform["points"]) == len(balanced["points"]) == 400
    cup_voxels = len(
        np.unique(voxelize(lifted)["voxels"][voxelize(lifted)["instance"] == 9], axis=0)
    )
    assert (uniform["instance"] == 9).sum() < 40
    assert (balanced["instance"] == 9).sum() == min(200, cup_voxels)
