"""Feature fusion: gradslam's PointFusion (Keller et al. 2013) carrying 2D features, vectorised.

Per frame (camera frame c, world frame w):
  vertex map   v_c = backproject(depth, K, I)            (the renderer's pixel-centre convention)
  normal map   n_c = normalize(cross(dx, dy)) from neighbour differences (per axis the shorter of
               the forward and backward one, so depth edges do not bend normals), facing the
               camera; 0 on the image border and without valid neighbours (never matched)
  confidence   alpha = max(exp(-|v_c|^2 / (2 sigma^2)), 1e-20), sigma = 0.6
Map points are projected into the frame (pixel = floor of the projected continuous coordinate);
a map point and the pixel it lands on are a candidate pair when |p - v_w| < 0.05 m and the
normals agree within 20 degrees; when several map points land on one pixel the one with the
highest confidence count wins (then the nearest). Matched points take confidence-weighted
running means, count c' = c + alpha:
  p' = (c p + alpha v_w) / c'   (same for colour; normals are renormalised after the mean)
and valid pixels without a match become new points with count alpha.

Features: a point's feature is the confidence-weighted mean of the mask-feature rows it was
observed with, sum(alpha_k g_{r_k}) / sum(alpha_k): exactly gradslam's running mean, kept as
(point, row, alpha) references instead of D floats per point, so memory is independent of D.
Not renormalised here (voxelisation renormalises). A point's instance id is the one of its most
confident observation. Points never observed inside a mask have no feature and are dropped.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift import LiftedPoints
from data_pipeline.render import backproject

SIGMA = 0.6
DIST_TH = 0.05
ANGLE_TH_DEG = 20.0


def camera_normals(v_cam: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit normals [H,W,3] of a camera-frame vertex map, facing the camera; 0 where undefined.

    Each tangent is the shorter of the forward and backward neighbour differences, so a pixel
    on a depth edge takes the tangent of its own surface, not one spanning the gap.
    """
    normals = np.zeros_like(v_cam)
    centre = v_cam[1:-1, 1:-1]
    ok = valid[1:-1, 1:-1]

    def tangent(forward_pt, backward_pt, forward_ok, backward_ok):
        fwd, bwd = forward_pt - centre, centre - backward_pt
        fwd_len = np.where(forward_ok, np.linalg.norm(fwd, axis=-1), np.inf)
        bwd_len = np.where(backward_ok, np.linalg.norm(bwd, axis=-1), np.inf)
        use_fwd = fwd_len <= bwd_len
        return np.where(use_fwd[..., None], fwd, bwd), np.isfinite(np.minimum(fwd_len, bwd_len))

    dx, ok_x = tangent(v_cam[1:-1, 2:], v_cam[1:-1, :-2], valid[1:-1, 2:], valid[1:-1, :-2])
    dy, ok_y = tangent(v_cam[2:, 1:-1], v_cam[:-2, 1:-1], valid[2:, 1:-1], valid[:-2, 1:-1])
    n = np.cross(dx, dy)
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    ok &= ok_x & ok_y & (length[..., 0] > 0)
    n = np.where(ok[..., None], n / np.maximum(length, 1e-20), 0.0)
    facing_away = np.einsum("hwi,hwi->hw", n, centre) > 0
    normals[1:-1, 1:-1] = np.where(facing_away[..., None], -n, n)
    return normals


class PointFusion:
    """The growing map. `integrate` one frame at a time, then `result()`."""

    def __init__(self, table: np.ndarray, sigma=SIGMA, dist_th=DIST_TH, angle_th_deg=ANGLE_TH_DEG):
        self.table = table
        self.sigma, self.dist_th = sigma, dist_th
        self.dot_th = float(np.cos(np.radians(angle_th_deg)))
        self.pos = np.zeros((0, 3), np.float32)
        self.nrm = np.zeros((0, 3), np.float32)
        self.col = np.zeros((0, 3), np.float32)
        self.cnt = np.zeros(0, np.float32)
        self.inst = np.zeros(0, np.int32)
        self.best = np.zeros(0, np.float32)  # alpha of the most confident observation
        self.refs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (point, row, alpha)

    def integrate(self, depth, K, cam_to_world, rgb, rows, instance):
        """One frame: depth [H,W], K [3,3], cam_to_world [4,4], rgb [H,W,3], rows [H,W] (mask-id
        map, -1 uncovered), instance [H,W]. Returns the association (matched map points, their
        flat pixels, flat pixels that became new points), e.g. for carrying other per-point data."""
        h, w = depth.shape
        valid = depth > 0
        v_cam = backproject(depth, K, np.eye(4, dtype=np.float32))
        n_cam = camera_normals(v_cam, valid)
        alpha = np.maximum(np.exp(-np.sum(v_cam**2, -1) / (2 * self.sigma**2)), 1e-20)
        rot, trans = cam_to_world[:3, :3].astype(np.float32), cam_to_world[:3, 3].astype(np.float32)
        # einsum, not BLAS, for [N,3] x [3,3]: BLAS threads cost more than the arithmetic here.
        v_w = np.einsum("hwj,ij->hwi", v_cam, rot) + trans
        n_w = np.einsum("hwj,ij->hwi", n_cam, rot)

        matched_point, matched_pixel = self._associate(v_w, n_w, valid, K, rot, trans, h, w)
        a = alpha.reshape(-1)[matched_pixel][:, None]
        c = self.cnt[matched_point][:, None]
        c_new = c + a
        flat_v, flat_n = v_w.reshape(-1, 3), n_w.reshape(-1, 3)
        flat_rgb = rgb.reshape(-1, 3).astype(np.float32)
        self.pos[matched_point] = (c * self.pos[matched_point] + a * flat_v[matched_pixel]) / c_new
        n_mean = c * self.nrm[matched_point] + a * flat_n[matched_pixel]
        self.nrm[matched_point] = n_mean / np.maximum(
            np.linalg.norm(n_mean, axis=1, keepdims=True), 1e-20
        )
        self.col[matched_point] = (
            c * self.col[matched_point] + a * flat_rgb[matched_pixel]
        ) / c_new
        self.cnt[matched_point] = c_new[:, 0]
        better = a[:, 0] > self.best[matched_point]
        self.inst[matched_point[better]] = instance.reshape(-1)[matched_pixel[better]]
        self.best[matched_point] = np.maximum(self.best[matched_point], a[:, 0])

        new = valid.reshape(-1).copy()
        new[matched_pixel] = False
        new_pixel = np.flatnonzero(new)
        first_new = len(self.pos)
        self.pos = np.concatenate([self.pos, flat_v[new_pixel]])
        self.nrm = np.concatenate([self.nrm, flat_n[new_pixel]])
        self.col = np.concatenate([self.col, flat_rgb[new_pixel]])
        self.cnt = np.concatenate([self.cnt, alpha.reshape(-1)[new_pixel]])
        self.best = np.concatenate([self.best, alpha.reshape(-1)[new_pixel]])
        self.inst = np.concatenate([self.inst, instance.reshape(-1)[new_pixel].astype(np.int32)])

        point = np.concatenate([matched_point, first_new + np.arange(len(new_pixel))])
        pixel = np.concatenate([matched_pixel, new_pixel])
        row = rows.reshape(-1)[pixel]
        has = row >= 0
        self.refs.append(
            (point[has].astype(np.int32), row[has].astype(np.int32), alpha.reshape(-1)[pixel[has]])
        )
        return matched_point, matched_pixel, new_pixel

    def _associate(self, v_w, n_w, valid, K, rot, trans, h, w):
        """(map point indices, flat pixel indices) of the unique matches of this frame."""
        if len(self.pos) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        p_cam = np.einsum("nj,ji->ni", self.pos - trans, rot)  # R^T (p - t)
        z = p_cam[:, 2]
        front = z > 1e-6
        proj = np.einsum("nj,ij->ni", p_cam, np.asarray(K, np.float32))
        with np.errstate(divide="ignore", invalid="ignore"):
            uc = proj[:, 0] / proj[:, 2]
            vc = proj[:, 1] / proj[:, 2]
        inside = front & (uc >= 0) & (uc < w) & (vc >= 0) & (vc < h)
        point = np.flatnonzero(inside)
        pixel = np.floor(vc[point]).astype(np.int64) * w + np.floor(uc[point]).astype(np.int64)
        flat_valid = valid.reshape(-1)
        keep = flat_valid[pixel]
        point, pixel = point[keep], pixel[keep]
        frame_v = v_w.reshape(-1, 3)[pixel]
        frame_n = n_w.reshape(-1, 3)[pixel]
        dist2 = np.sum((self.pos[point] - frame_v) ** 2, axis=1)
        dot = np.sum(self.nrm[point] * frame_n, axis=1)
        ok = (dist2 < self.dist_th**2) & (dot > self.dot_th)
        point, pixel, dist2 = point[ok], pixel[ok], dist2[ok]
        # One map point per pixel: highest count first, then the closest.
        order = np.lexsort((dist2, -self.cnt[point], pixel))
        point, pixel = point[order], pixel[order]
        first = np.ones(len(pixel), bool)
        first[1:] = pixel[1:] != pixel[:-1]
        return point[first], pixel[first]

    def result(self) -> LiftedPoints:
        points = np.concatenate([r[0] for r in self.refs]) if self.refs else np.zeros(0, np.int32)
        lifted = LiftedPoints(
            points=self.pos.astype(np.float32),
            colors=np.clip(np.rint(self.col), 0, 255).astype(np.uint8),
            instance=self.inst,
            ref_point=points,
            ref_row=np.concatenate([r[1] for r in self.refs]) if self.refs else points,
            ref_weight=(
                np.concatenate([r[2] for r in self.refs]).astype(np.float32)
                if self.refs
                else np.zeros(0, np.float32)
            ),
            table=self.table,
        )
        has_feature = np.zeros(len(self.pos), bool)
        has_feature[lifted.ref_point] = True
        return lifted.select(has_feature)


def lift_fusion(
    views,
    pixels: PixelFeatures,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    margin: float = 0.02,
    sigma: float = SIGMA,
    dist_th: float = DIST_TH,
    angle_th_deg: float = ANGLE_TH_DEG,
) -> LiftedPoints:
    """views (`render.Views`) + their pixel features -> fused LiftedPoints (cropped to `bounds`)."""
    fusion = PointFusion(pixels.table, sigma, dist_th, angle_th_deg)
    for k in range(len(views.depth)):
        fusion.integrate(
            views.depth[k],
            views.K[k],
            views.cam_to_world[k],
            views.rgb[k],
            pixels.mask_ids[k],
            views.instance[k],
        )
    lifted = fusion.result()
    if bounds is not None:
        lo, hi = np.asarray(bounds[0]) - margin, np.asarray(bounds[1]) + margin
        lifted = lifted.select(np.all((lifted.points >= lo) & (lifted.points <= hi), axis=1))
    return lifted
