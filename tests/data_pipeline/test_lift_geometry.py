"""Direct reconstruction and feature fusion on a rendered synthetic room."""

import dataclasses

import numpy as np
import open3d as o3d
import pytest

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift import validate_views
from data_pipeline.lift.direct import lift_direct
from data_pipeline.lift.fusion import PointFusion, camera_normals, lift_fusion
from data_pipeline.render import backproject, render_scene
from data_pipeline.scenes.synthetic import make_scene
from llm3d_jax.fileio import InputError


@pytest.fixture(scope="module")
def room():
    scene = make_scene(0, 0)
    views = render_scene(scene, num_views=4, width=64, height=48, seed=0)
    caster = o3d.t.geometry.RaycastingScene()
    caster.add_triangles(
        o3d.core.Tensor(scene.vertices), o3d.core.Tensor(scene.faces.astype(np.uint32))
    )
    distance = lambda p: caster.compute_distance(o3d.core.Tensor(p.astype(np.float32))).numpy()
    bounds = (scene.vertices.min(0), scene.vertices.max(0))
    return scene, views, distance, bounds


def agreeing_features(views, dim=16, seed=0):
    """Every view gives object k (and the structure) the same feature row: views that agree."""
    ids = np.unique(views.instance[views.depth > 0])
    table = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    rows = np.searchsorted(ids, views.instance).astype(np.int32)
    rows = np.where(views.depth > 0, rows, -1)
    return PixelFeatures(mask_ids=rows, table=table), ids


def test_direct_points_lie_on_the_mesh_and_carry_their_mask_feature(room):
    scene, views, distance, bounds = room
    pixels, ids = agreeing_features(views)
    lifted = lift_direct(views, pixels, bounds)
    assert len(lifted) == int((views.depth > 0).sum())
    assert distance(lifted.points).max() < 1e-3
    cos = np.sum(lifted.dense_features() * pixels.table[np.searchsorted(ids, lifted.instance)], 1)
    assert cos.min() > 0.99
    sampled = lift_direct(views, pixels, bounds, max_points=500, seed=3)
    assert len(sampled) == 500


def test_fusion_points_lie_on_the_mesh_and_carry_their_mask_feature(room):
    scene, views, distance, bounds = room
    pixels, ids = agreeing_features(views)
    lifted = lift_fusion(views, pixels, bounds)
    direct = lift_direct(views, pixels, bounds)
    # Overlapping views merge: fewer points than pixels, each one on the surface.
    assert len(lifted) < 0.9 * len(direct)
    d = distance(lifted.points)
    assert d.max() < 0.01 and np.percentile(d, 99) < 1e-3
    cos = np.sum(lifted.dense_features() * pixels.table[np.searchsorted(ids, lifted.instance)], 1)
    assert cos[lifted.instance >= 0].min() > 0.99
    # Structure points where an object touches the floor may merge a pixel of the object (a
    # 1-pixel table leg is within 5 cm of the floor with a floor-like normal): rare.
    assert np.mean(cos > 0.99) > 0.995


def test_fusion_merges_a_repeated_frame_exactly():
    """The same frame twice: every pixel with a normal matches itself; counts add up."""
    h, w = 12, 16
    depth = np.full((h, w), 2.0, np.float32)
    K = np.array([[10, 0, 8], [0, 10, 6], [0, 0, 1]], np.float32)
    pose = np.eye(4, dtype=np.float32)
    rgb = np.full((h, w, 3), 100, np.uint8)
    rows = np.zeros((h, w), np.int32)
    inst = np.zeros((h, w), np.int32)
    fusion = PointFusion(np.eye(1, 4, dtype=np.float32))
    fusion.integrate(depth, K, pose, rgb, rows, inst)
    n_first = len(fusion.pos)
    fusion.integrate(depth, K, pose, rgb, rows, inst)
    interior = (h - 2) * (w - 2)  # border pixels have no normal and are added again
    assert len(fusion.pos) == n_first + (h * w - interior)
    v_cam = backproject(depth, K, pose)
    alpha = np.exp(-np.sum(v_cam**2, -1) / (2 * 0.6**2))
    np.testing.assert_allclose(
        fusion.cnt[:n_first].reshape(h, w)[1:-1, 1:-1], 2 * alpha[1:-1, 1:-1], rtol=1e-5
    )
    normals = camera_normals(v_cam, depth > 0)
    np.testing.assert_allclose(
        normals[1:-1, 1:-1], np.broadcast_to([0, 0, -1], (h - 2, w - 2, 3)), atol=1e-6
    )


def test_fusion_with_noisy_poses_and_depth_stays_within_2cm(room):
    """Poses jittered by ~0.3 degrees and 1 cm, depth by 0.5 %: fused points stay within a stated
    error of the mesh (median < 1 cm, 90th percentile < 2 cm), still merging across views."""
    scene, views, distance, bounds = room
    rng = np.random.default_rng(0)
    poses = views.cam_to_world.copy()
    for p in poses:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.radians(0.3)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
        p[:3, :3] = (rot @ p[:3, :3]).astype(np.float32)
        p[:3, 3] += rng.normal(scale=0.01 / np.sqrt(3), size=3).astype(np.float32)
    depth = views.depth * (1 + rng.normal(scale=0.005, size=views.depth.shape)).astype(np.float32)
    noisy = dataclasses.replace(views, cam_to_world=poses, depth=depth)
    pixels, _ = agreeing_features(views)
    lifted = lift_fusion(noisy, pixels, bounds)
    d = distance(lifted.points)
    assert np.median(d) < 0.01 and np.percentile(d, 90) < 0.02
    assert len(lifted) < int((views.depth > 0).sum())


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda v: {"depth": np.where(v.depth > 0, np.nan, 0).astype(np.float32)}, "NaN/inf"),
        (lambda v: {"depth": np.zeros_like(v.depth)}, "zero everywhere"),
        (lambda v: {"rgb": v.rgb[:, :, :-1]}, "mismatched sizes: rgb"),
        (
            lambda v: {"cam_to_world": v.cam_to_world * np.array([2, 1, 1, 1], np.float32)},
            "not a rigid",
        ),
    ],
)
def test_bad_views_are_clear_errors(room, change, message):
    _, views, _, _ = room
    bad = dataclasses.replace(views, **change(views))
    with pytest.raises(InputError, match=f"scene_x: .*{message}"):
        validate_views(bad, "scene_x")
