r"""3D lifting throughput and memory, against naive dense implementations run in the same process.

    .venv/bin/python tools/bench/lifting.py [--views 8 --width 320 --height 240 --dim 1408]

On one synthetic room (`make_scene(0, 0)`, views rendered once, not timed) with pixel features
of width D (instance masks, random unit rows: the ViT is not part of lifting):
  direct   ours: sparse row references -> voxelize (one sparse matrix product)
           dense: per frame a full H x W x D feature map, gathered per pixel, concatenated to
                  [N, D], then the same voxelize fed those [N, D] features
  fusion   ours: PointFusion with (point, row, alpha) references
           dense: the same geometry, with a full H x W x D map per frame and D running-mean
                  floats per map point (gradslam's feature fusion), same voxelize on [N, D]
Both variants of a method produce the same file (checked: cosine > 0.999 per voxel); the ratio
is dense time / ours. Peak memory is numpy's (tracemalloc) per scene, at D and at D = 64, to
show what grows with D. Neural field: seconds per scene for ours (features on the active cells,
top-k samples) and the dense variant (a full-grid D-channel feature volume rendered from every
sample) at a reduced config (`--nf-*`), both after a warm-up run that compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import tracemalloc

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipeline.features2d import PixelFeatures
from data_pipeline.lift import LiftedPoints
from data_pipeline.lift import neural_field as nf
from data_pipeline.lift.direct import lift_direct
from data_pipeline.lift.fusion import PointFusion, lift_fusion
from data_pipeline.lift.voxelize import grid_for_bounds, voxelize
from data_pipeline.render import backproject, render_scene
from data_pipeline.scenes.synthetic import make_scene


def pixel_features(views, dim: int, seed: int = 0) -> PixelFeatures:
    """One random unit row per (view, instance) mask; no-hit pixels uncovered."""
    rng = np.random.default_rng(seed)
    mask_ids = np.full(views.depth.shape, -1, np.int32)
    offset = 0
    for k in range(len(views.depth)):
        valid = views.depth[k] > 0
        ids, inverse = np.unique(views.instance[k][valid], return_inverse=True)
        mask_ids[k][valid] = inverse.reshape(-1) + offset
        offset += len(ids)
    table = rng.normal(size=(offset, dim)).astype(np.float32)
    return PixelFeatures(mask_ids, table / np.linalg.norm(table, axis=1, keepdims=True))


def dense_voxelize(points, feats, origin, voxel):
    """The same voxelize, fed [N,D] per-point features (identity references into them)."""
    n = len(points)
    lifted = LiftedPoints(
        points=points.astype(np.float32),
        colors=np.zeros((n, 3), np.uint8),
        instance=np.full(n, -1, np.int32),
        ref_point=np.arange(n, dtype=np.int32),
        ref_row=np.arange(n, dtype=np.int32),
        ref_weight=np.ones(n, np.float32),
        table=feats,
    )
    return voxelize(lifted, origin, voxel)["features"].astype(np.float32)


def dense_direct(views, pixels, bounds, origin, voxel):
    feats, points = [], []
    for k in range(len(views.depth)):
        full = np.where(  # the full H x W x D map of this frame
            (pixels.mask_ids[k] >= 0)[..., None], pixels.table[np.maximum(pixels.mask_ids[k], 0)], 0
        ).astype(np.float32)
        valid = (views.depth[k] > 0) & (pixels.mask_ids[k] >= 0)
        p = backproject(views.depth[k], views.K[k], views.cam_to_world[k])[valid]
        keep = np.all((p >= bounds[0] - 0.02) & (p <= bounds[1] + 0.02), axis=1)
        points.append(p[keep])
        feats.append(full[valid][keep])
    points, feats = np.concatenate(points), np.concatenate(feats)
    return len(points), dense_voxelize(points, feats, origin, voxel)


def dense_fusion(views, pixels, bounds, origin, voxel):
    fusion = PointFusion(pixels.table)
    dense = np.zeros((0, pixels.dim), np.float32)  # D running-mean floats per map point
    for k in range(len(views.depth)):
        full = np.where(
            (pixels.mask_ids[k] >= 0)[..., None], pixels.table[np.maximum(pixels.mask_ids[k], 0)], 0
        ).astype(np.float32)
        before = fusion.cnt.copy()
        point, pixel, new = fusion.integrate(
            views.depth[k],
            views.K[k],
            views.cam_to_world[k],
            views.rgb[k],
            pixels.mask_ids[k],
            views.instance[k],
        )
        flat = full.reshape(-1, pixels.dim)
        c, c_new = before[point][:, None], fusion.cnt[point][:, None]
        dense[point] = (c * dense[point] + (c_new - c) * flat[pixel]) / c_new
        dense = np.concatenate([dense, flat[new]])
    has = np.linalg.norm(dense, axis=1) > 0
    inside = np.all((fusion.pos >= bounds[0] - 0.02) & (fusion.pos <= bounds[1] + 0.02), axis=1)
    keep = has & inside
    return int(keep.sum()), dense_voxelize(fusion.pos[keep], dense[keep], origin, voxel)


def measure(fn, repeats):
    """(best seconds over `repeats` untraced runs, peak traced bytes of one more run, result)."""
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()  # tracing slows allocation-heavy code: kept out of the timed runs
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak, out


def dense_field_features(views, pixels, bounds, cfg, fit):
    """The dense neural-field feature stage: a D-channel feature value in every grid cell,
    rendered from all samples of each ray (same loss and optimiser as ours)."""
    lo = jnp.asarray(fit.lo)
    shape = fit.density.shape
    hi = lo + jnp.asarray(shape, jnp.float32) * fit.cell
    rays_o, rays_d = nf.pixel_rays(views.K, views.cam_to_world, *views.depth.shape[1:])
    covered = np.flatnonzero(pixels.mask_ids.reshape(-1) >= 0)
    o, d = jnp.asarray(rays_o[covered]), jnp.asarray(rays_d[covered])
    targets = jnp.asarray(pixels.table[pixels.mask_ids.reshape(-1)[covered]])
    density = jnp.asarray(fit.density)
    tx = optax.adam(cfg.feature_learning_rate)
    feats = jnp.zeros((int(np.prod(shape)), pixels.dim))
    state = tx.init(feats)

    @jax.jit
    def step(feats, state, key, density, o, d, targets):  # arrays as arguments, not constants
        pick = jax.random.randint(key, (cfg.rays_per_step,), 0, o.shape[0])
        w, _, idx, wts = nf._weights(
            density, o[pick], d[pick], lo, hi, fit.cell, cfg.near, cfg.samples_per_ray, 0.5
        )

        def loss_fn(f):
            at_samples = jnp.sum(f[idx] * wts[..., None], -2)  # [B,S,D]
            rendered = jnp.sum(w[..., None] * at_samples, 1)
            return jnp.mean(jnp.sum((rendered - targets[pick]) ** 2, -1))

        loss, grads = jax.value_and_grad(loss_fn)(feats)
        updates, state = tx.update(grads, state, feats)
        return optax.apply_updates(feats, updates), state, loss

    key = jax.random.key(0)
    for _ in range(cfg.feature_steps):
        key, sub = jax.random.split(key)
        feats, state, loss = step(feats, state, sub, density, o, d, targets)
    return float(loss)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--dim", type=int, default=1408)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nf-resolution", type=int, default=32)
    parser.add_argument("--nf-steps", type=int, default=100)
    parser.add_argument("--nf-feature-steps", type=int, default=20)
    parser.add_argument("--nf-rays", type=int, default=512)
    parser.add_argument("--nf-samples", type=int, default=48)
    args = parser.parse_args(argv)

    scene = make_scene(0, 0)
    views = render_scene(scene, args.views, args.width, args.height, seed=0)
    bounds = (scene.vertices.min(0), scene.vertices.max(0))
    origin, voxel = grid_for_bounds(bounds[0] - 0.03, bounds[1] + 0.03)
    print(
        f"devices: {jax.devices()}; scene {scene.scene_id}: {args.views} views {args.width}x{args.height}, D={args.dim}"
    )
    print(
        f"{'method':8} {'variant':6} {'s/scene':>8} {'frames/s':>9} {'points/s':>11} {'peak MB':>8} {'peak MB (D=64)':>15}"
    )
    for method in ("direct", "fusion"):
        rows = {}
        for variant in ("ours", "dense"):
            results = {}
            for dim in (args.dim, 64):
                pixels = pixel_features(views, dim)
                if variant == "ours":
                    lift = lift_direct if method == "direct" else lift_fusion

                    def run(pixels=pixels, lift=lift):
                        lifted = lift(views, pixels, bounds)
                        out = voxelize(lifted, origin, voxel)
                        return len(lifted), out["features"].astype(np.float32)  # as dense_voxelize
                else:
                    dense = dense_direct if method == "direct" else dense_fusion

                    def run(pixels=pixels, dense=dense):
                        return dense(views, pixels, bounds, origin, voxel)

                results[dim] = measure(run, args.repeats if dim == args.dim else 0)
            seconds, peak, (num_points, feats) = results[args.dim]
            rows[variant] = (seconds, feats)
            print(
                f"{method:8} {variant:6} {seconds:8.3f} {args.views / seconds:9.1f} "
                f"{num_points / seconds:11.0f} {peak / 2**20:8.0f} {results[64][1] / 2**20:15.0f}"
            )
        agree = np.sum(rows["ours"][1] * rows["dense"][1], axis=1) / np.maximum(
            np.linalg.norm(rows["ours"][1], axis=1) * np.linalg.norm(rows["dense"][1], axis=1),
            1e-12,
        )
        print(
            f"{method:8} ratio  dense/ours time = {rows['dense'][0] / rows['ours'][0]:.1f}x "
            f"(same voxels: {len(rows['ours'][1]) == len(rows['dense'][1])}, min cosine {agree.min():.4f})"
        )

    cfg = nf.FieldConfig(
        resolution=args.nf_resolution,
        samples_per_ray=args.nf_samples,
        rays_per_step=args.nf_rays,
        steps=args.nf_steps,
        feature_steps=args.nf_feature_steps,
    )
    pixels = pixel_features(views, args.dim)
    nf.lift_neural_field(views, pixels, bounds, cfg)  # warm-up: compiles
    start = time.perf_counter()
    lifted, fit = nf.lift_neural_field(views, pixels, bounds, cfg)
    ours = time.perf_counter() - start
    geometry_cfg = dataclasses.replace(cfg, feature_steps=0)
    start = time.perf_counter()
    _, fit0 = nf.lift_neural_field(views, pixels, bounds, geometry_cfg)
    geometry = time.perf_counter() - start
    dense_field_features(views, pixels, bounds, dataclasses.replace(cfg, feature_steps=1), fit0)
    start = time.perf_counter()
    dense_field_features(views, pixels, bounds, cfg, fit0)
    dense = geometry + time.perf_counter() - start
    print(
        f"neural_field: ours {ours:.1f} s/scene ({len(lifted)} points; resolution {cfg.resolution}, "
        f"{cfg.steps}+{cfg.feature_steps} steps of {cfg.rays_per_step} rays x {cfg.samples_per_ray} samples); "
        f"dense full-grid features {dense:.1f} s/scene; ratio {dense / ours:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
