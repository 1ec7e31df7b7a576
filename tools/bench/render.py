r"""Scene generation and headless rendering throughput, against references measured in the same run.

    .venv/bin/python tools/bench/render.py [--scenes 40] [--views 16]

Prints
  - synthetic scenes per minute (`make_scene`, and `make_scene` + `Scene.save`),
  - frames per second of `Raycaster.render` (rgb + depth + instance + normals) at 320x240 and
    640x480, the full `render_scene` (camera sampling included) at 320x240, and the whole CLI
    step per scene (render + views file + contact sheet),
  - references, same scene, same cameras:
      raw-cast:  open3d `cast_rays` alone on the same rays (no colours / ids / normals): the
                 ceiling our per-pixel work sits under (ratio ours / raw-cast <= 1),
      naive:     per-pixel Python loop, Moller-Trumbore against every triangle with numpy, on a
                 16x12 crop, scaled to a full frame (ratio ours / naive = speed-up).
Timings use whatever cores open3d finds; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import open3d as o3d

from data_pipeline import render
from data_pipeline.scenes import synthetic


def _timed(fn, repeat=1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def _rays(pose, K, width, height):
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    directions = pixels @ np.linalg.inv(K.astype(np.float64)).T @ pose[:3, :3].T
    origins = np.broadcast_to(pose[:3, 3], directions.shape)
    return np.concatenate([origins, directions], axis=1).astype(np.float32)


def naive_pixel_depth(vertices, faces, origin, direction):
    """Reference: nearest hit of one ray over all triangles (Moller-Trumbore, numpy over triangles)."""
    p0, p1, p2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    e1, e2 = p1 - p0, p2 - p0
    h = np.cross(direction, e2)
    a = np.einsum("fi,fi->f", e1, h)
    ok = np.abs(a) > 1e-12
    f = np.where(ok, 1.0 / np.where(ok, a, 1.0), 0.0)
    s = origin - p0
    u = f * np.einsum("fi,fi->f", s, h)
    q = np.cross(s, e1)
    v = f * (q @ direction)
    t = f * np.einsum("fi,fi->f", e2, q)
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-9)
    return t[hit].min() if hit.any() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenes", type=int, default=40, help="scenes generated for the scenes/minute figure"
    )
    parser.add_argument("--views", type=int, default=16, help="frames per resolution")
    args = parser.parse_args()
    print(f"open3d {o3d.__version__}, {os.cpu_count()} CPUs visible")

    # ---- scene generation
    seconds, _ = _timed(lambda: [synthetic.make_scene(0, i) for i in range(args.scenes)])
    print(f"synthetic scenes/minute (make_scene):          {60 * args.scenes / seconds:10.0f}")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, _ = _timed(
            lambda: [synthetic.make_scene(0, i).save(tmp) for i in range(args.scenes)]
        )
        print(f"synthetic scenes/minute (make_scene + save):   {60 * args.scenes / seconds:10.0f}")

    scene = synthetic.make_scene(0, 3)
    raycaster = render.Raycaster(scene)
    print(
        f"bench scene {scene.scene_id}: {len(scene.faces)} triangles, {len(scene.objects)} objects"
    )
    poses = render.room_cameras(raycaster, args.views, np.random.default_rng(0))
    raw_scene = o3d.t.geometry.RaycastingScene()  # the reference: the same mesh, bare cast_rays
    raw_scene.add_triangles(
        o3d.core.Tensor(scene.vertices), o3d.core.Tensor(scene.faces.astype(np.uint32))
    )
    for width, height in ((320, 240), (640, 480)):
        K = render.pinhole_K(width, height, 80.0)
        start = time.perf_counter()
        for pose in poses:
            raycaster.render(pose, K, width, height)
        ours = (time.perf_counter() - start) / len(poses)
        rays = [o3d.core.Tensor(_rays(pose, K, width, height)) for pose in poses]
        start = time.perf_counter()
        for r in rays:
            raw_scene.cast_rays(r)
        raw = (time.perf_counter() - start) / len(poses)
        print(
            f"{width}x{height}: ours {1 / ours:8.1f} frames/s | raw-cast {1 / raw:8.1f} frames/s"
            f" | ours/raw-cast {raw / ours:5.2f}"
        )
    # Naive reference on a 16x12 crop of the 320x240 frame, scaled to the whole frame.
    K = render.pinhole_K(320, 240, 80.0)
    crop = (
        _rays(poses[0], K, 320, 240)
        .reshape(240, 320, 6)[114:126, 152:168]
        .reshape(-1, 6)
        .astype(np.float64)
    )
    vertices = scene.vertices.astype(np.float64)
    naive, depth = _timed(
        lambda: [naive_pixel_depth(vertices, scene.faces, r[:3], r[3:]) for r in crop]
    )
    ours_crop = raycaster.render(poses[0], K, 320, 240)["depth"][114:126, 152:168].ravel()
    agree = np.abs(np.array(depth) - ours_crop).max()
    naive_frame = naive * (320 * 240) / len(crop)
    ours_320, _ = _timed(lambda: raycaster.render(poses[0], K, 320, 240), repeat=3)
    print(
        f"320x240: naive per-pixel loop {1 / naive_frame:10.4f} frames/s (from a {len(crop)}-pixel crop;"
        f" max depth difference {agree:.1e} m) | ours/naive {naive_frame / ours_320:8.0f}x"
    )

    # ---- end to end
    seconds, _ = _timed(
        lambda: render.render_scene(scene, num_views=8, width=320, height=240, seed=0)
    )
    print(f"render_scene 8 views 320x240 (camera sampling included): {8 / seconds:8.1f} frames/s")
    with tempfile.TemporaryDirectory() as tmp:

        def cli_step():
            views = render.render_scene(scene, num_views=8, width=320, height=240, seed=0)
            views.save(tmp)
            render.save_contact_sheet(views, os.path.join(tmp, "sheet.png"))

        seconds, _ = _timed(cli_step)
        print(f"render CLI step per scene (8 views 320x240 + views file + sheet): {seconds:6.2f} s"
              f" = {60 / seconds:6.1f} scenes/minute")  # fmt: skip


if __name__ == "__main__":
    main()
