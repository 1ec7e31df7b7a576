"""Direct reconstruction: back-project every covered pixel with its known camera.

Each valid pixel (depth > 0 and covered by a mask) becomes a point at
`render.backproject(depth, K, cam_to_world)` (the one pixel-centre convention) carrying its
colour, instance id and one reference to its mask-feature row. Points outside the scene's AABB
(plus `margin`) are cropped; `max_points` keeps a seeded random sample (the release kept 300k).
"""

from __future__ import annotations

import numpy as np

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift import LiftedPoints
from data_pipeline.render import backproject


def lift_direct(
    views,
    pixels: PixelFeatures,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    margin: float = 0.02,
    max_points: int | None = None,
    seed: int = 0,
) -> LiftedPoints:
    """views (`render.Views`) + their pixel features -> LiftedPoints (one reference per point)."""
    valid = (views.depth > 0) & (pixels.mask_ids >= 0)
    points = np.concatenate(
        [
            backproject(views.depth[k], views.K[k], views.cam_to_world[k])[valid[k]]
            for k in range(len(views.depth))
        ]
    )
    rows = pixels.mask_ids[valid]
    colors = views.rgb[valid]
    instance = views.instance[valid]
    keep = np.ones(len(points), bool)
    if bounds is not None:
        lo, hi = np.asarray(bounds[0]) - margin, np.asarray(bounds[1]) + margin
        keep = np.all((points >= lo) & (points <= hi), axis=1)
    index = np.flatnonzero(keep)
    if max_points is not None and len(index) > max_points:
        index = np.sort(np.random.default_rng(seed).choice(index, max_points, replace=False))
    n = len(index)
    return LiftedPoints(
        points=points[index].astype(np.float32),
        colors=colors[index].astype(np.uint8),
        instance=instance[index].astype(np.int32),
        ref_point=np.arange(n, dtype=np.int32),
        ref_row=rows[index].astype(np.int32),
        ref_weight=np.ones(n, np.float32),
        table=pixels.table,
    )
