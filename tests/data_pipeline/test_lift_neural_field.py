"""Neural field: fitted from RGB only, the loss falls and the colours of a simple scene come back."""

import dataclasses

import numpy as np
import open3d as o3d
import pytest

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift.neural_field import FieldConfig, lift_neural_field
from data_pipeline.render import look_at, pinhole_K, render_views
from data_pipeline.scenes import Scene, SceneObject

WALL_COLORS = np.array(
    [[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200], [40, 200, 200]]
)


def box_room(size=2.0, tiles=4):
    """A closed size^3 room; wall k (instance k) is a tiles x tiles checkerboard of
    WALL_COLORS[k] and a third of it (texture lets RGB pin down the geometry)."""
    vertices, faces, colors, instance = [], [], [], []
    centre, step = np.full(3, size / 2), size / tiles
    for k in range(6):
        axis, side = divmod(k, 2)
        a1, a2 = [a for a in range(3) if a != axis]
        for i in range(tiles):
            for j in range(tiles):
                quad = np.zeros((4, 3), np.float32)
                quad[:, axis] = side * size
                quad[:, a1] = (i + np.array([0, 1, 1, 0])) * step
                quad[:, a2] = (j + np.array([0, 0, 1, 1])) * step
                base = len(vertices) * 4
                for tri in ((0, 1, 2), (0, 2, 3)):
                    a, b, d = quad[list(tri)]
                    inward = np.cross(b - a, d - a) @ (centre - a) > 0
                    faces.append([base + t for t in (tri if inward else tri[::-1])])
                vertices.append(quad)
                tile = WALL_COLORS[k] if (i + j) % 2 == 0 else WALL_COLORS[k] // 3
                colors.append(np.repeat(tile[None], 4, 0))
                instance.append(np.full(4, k))
    objects = [SceneObject(k, f"wall{k}", np.zeros(6, np.float32)) for k in range(6)]
    return Scene(
        "box_room",
        np.concatenate(vertices),
        np.array(faces, np.int32),
        np.concatenate(colors).astype(np.uint8),
        np.concatenate(instance).astype(np.int32),
        objects,
    )


@pytest.fixture(scope="module")
def fitted():
    scene = box_room()
    rng = np.random.default_rng(0)
    eyes, targets = rng.uniform(0.6, 1.4, (12, 3)), rng.uniform(0, 2, (12, 3))
    cams = np.stack([look_at(e, t) for e, t in zip(eyes, targets)])
    views = render_views(scene, cams, pinhole_K(32, 24, 90.0), 32, 24)
    # RGB only: the field must never need depth.
    views = dataclasses.replace(views, depth=np.zeros_like(views.depth))
    table = np.eye(6, 8, dtype=np.float32)
    # Wall k -> feature row k in every view (views that agree).
    pixels = PixelFeatures(mask_ids=views.instance.astype(np.int32), table=table)
    config = FieldConfig(
        resolution=16, samples_per_ray=32, rays_per_step=384, steps=300, feature_steps=60
    )
    lifted, fit = lift_neural_field(views, pixels, (np.zeros(3), np.full(3, 2.0)), config)
    return scene, views, lifted, fit, table


def test_loss_falls(fitted):
    _, _, _, fit, _ = fitted
    assert fit.color_losses[-10:].mean() < 0.25 * fit.color_losses[:10].mean()
    assert fit.feature_losses[-10:].mean() < 0.5 * fit.feature_losses[:10].mean()


def test_recovers_colours_and_geometry_from_rgb_only(fitted):
    """Cells are 0.15 m: points within 0.1 m of the walls (median), colours within 30/255 of the
    tile they sit on (median), features naming their wall (> 90 %)."""
    scene, _, lifted, _, table = fitted
    assert len(lifted) > 500
    caster = o3d.t.geometry.RaycastingScene()
    caster.add_triangles(
        o3d.core.Tensor(scene.vertices), o3d.core.Tensor(scene.faces.astype(np.uint32))
    )
    query = caster.compute_closest_points(o3d.core.Tensor(lifted.points))
    corner = scene.faces[query["primitive_ids"].numpy()][:, 0]
    distance = np.linalg.norm(query["points"].numpy() - lifted.points, axis=1)
    assert np.median(distance) < 0.1
    colour_error = np.abs(lifted.colors.astype(float) - scene.colors[corner]).max(axis=1)
    assert np.median(colour_error) < 30
    feats = lifted.dense_features()
    assert np.mean(np.argmax(feats @ table.T, axis=1) == scene.instance[corner]) > 0.9
