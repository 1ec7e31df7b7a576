"""Lifting pixel-aligned 2D features to 3D points: direct reconstruction, feature fusion, neural field.

Every method returns `LiftedPoints`; `voxelize.voxelize` turns them into the arrays of the scene
feature file. Features stay compact: a point's feature is a weighted mean of rows of a table
(the 2D mask-feature table for direct and fusion, so nothing ever holds D floats per pixel), kept
as a sparse list of (point, row, weight) references.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llm3d_jax.fileio import InputError


@dataclasses.dataclass
class LiftedPoints:
    """N points with features as sparse references into `table`.

    points float32 [N,3]; colors uint8 [N,3]; instance int32 [N] (-1 none);
    ref_point int32 [R], ref_row int32 [R], ref_weight float32 [R] > 0: point n's feature is
    sum(w * table[row]) / sum(w) over its references (every point has at least one);
    table float32 [K,D].
    """

    points: np.ndarray
    colors: np.ndarray
    instance: np.ndarray
    ref_point: np.ndarray
    ref_row: np.ndarray
    ref_weight: np.ndarray
    table: np.ndarray

    def __len__(self) -> int:
        return len(self.points)

    def dense_features(self) -> np.ndarray:
        """[N,D] float32 (the normalised weighted means); for tests and small scenes only."""
        from scipy import sparse

        n = len(self.points)
        # Normalise the weights per point first: confidences can be ~1e-20.
        weight = self.ref_weight / np.bincount(self.ref_point, self.ref_weight, n)[self.ref_point]
        w = sparse.csr_matrix((weight, (self.ref_point, self.ref_row)), shape=(n, len(self.table)))
        feats = np.asarray(w @ self.table)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def select(self, keep: np.ndarray) -> LiftedPoints:
        """The points where bool `keep` [N] is true (references renumbered)."""
        new_index = np.cumsum(keep) - 1
        ref_keep = keep[self.ref_point]
        return LiftedPoints(
            points=self.points[keep],
            colors=self.colors[keep],
            instance=self.instance[keep],
            ref_point=new_index[self.ref_point[ref_keep]].astype(np.int32),
            ref_row=self.ref_row[ref_keep],
            ref_weight=self.ref_weight[ref_keep],
            table=self.table,
        )


def validate_views(views, where: str, need_depth: bool = True) -> None:
    """InputError (naming `where`) for views that a lifting method cannot use: image sizes that
    disagree, depth with NaN/inf, negative or everywhere zero (when `need_depth`; the neural field
    works from RGB only), bad intrinsics, a camera pose that is not a rigid transform."""
    depth, rgb = np.asarray(views.depth), np.asarray(views.rgb)
    if depth.ndim != 3:
        raise InputError(where, f"depth must be [V,H,W], got shape {depth.shape}")
    v, h, w = depth.shape
    for name, shape in (
        ("rgb", (v, h, w, 3)),
        ("instance", (v, h, w)),
        ("K", (v, 3, 3)),
        ("cam_to_world", (v, 4, 4)),
    ):
        got = np.shape(getattr(views, name))
        if got != shape:
            raise InputError(where, f"mismatched sizes: {name} is {got}, depth is {depth.shape}")
    if rgb.dtype != np.uint8:
        raise InputError(where, f"rgb must be uint8, got {rgb.dtype}")
    if need_depth and not np.isfinite(depth).all():
        bad = int((~np.isfinite(depth)).sum())
        raise InputError(where, f"depth has {bad} NaN/inf values")
    if need_depth and (depth < 0).any():
        raise InputError(where, "depth has negative values")
    if need_depth and not (depth > 0).any():
        raise InputError(where, "depth is zero everywhere (no view sees anything)")
    K = np.asarray(views.K, np.float64)
    if not np.isfinite(K).all() or (K[:, 0, 0] <= 0).any() or (K[:, 1, 1] <= 0).any():
        raise InputError(where, "intrinsics K must be finite with positive focal lengths")
    pose = np.asarray(views.cam_to_world, np.float64)
    for k, p in enumerate(pose):
        r = p[:3, :3]
        if (
            not np.isfinite(p).all()
            or not np.allclose(p[3], [0, 0, 0, 1], atol=1e-5)
            or not np.allclose(r.T @ r, np.eye(3), atol=1e-3)
            or abs(np.linalg.det(r) - 1) > 1e-3
        ):
            raise InputError(where, f"view {k}: cam_to_world is not a rigid transform")


__all__ = ["LiftedPoints", "validate_views"]
