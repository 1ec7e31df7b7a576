"""Writes a small hand-built scan in the exact ScanNet file formats into tests/fixtures/scannet/.

    python tools/make_scannet_fixture.py [--out tests/fixtures/scannet]

scene0000_00/ holds, in raw (unaligned) coordinates:
  a floor quad (label "floor": structure), a chair made of two boxes (two segments), a table box,
  and a small unlabelled box; a binary little-endian PLY with the ScanNet header, the segs and
  aggregation JSON, and a meta .txt whose axisAlignment rotates 90 degrees about z and shifts by
  (3, -0.5, 0.1). Hand-computed aligned boxes (tests compare with these numbers):
  chair [1.5, 0.5, 0.1, 2.0, 1.0, 1.0], table [1.7, 1.5, 0.1, 2.5, 2.7, 0.85].
scene0000_00/frames/ is an RGB-D export (color/<i>.jpg at 160x120, depth/<i>.png in mm at 80x60,
  pose/<i>.txt raw-frame camera-to-world, intrinsic/intrinsic_{color,depth}.txt with ScanNet's
  integer pixel centres); frame 2 has ScanNet's -inf "lost tracking" pose.
"""

from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np
from PIL import Image

from data_pipeline.render import Raycaster, look_at, pinhole_K
from data_pipeline.scenes.scene import Scene

SCENE_ID = "scene0000_00"
AXIS_ALIGNMENT = np.array([[0, -1, 0, 3.0], [1, 0, 0, -0.5], [0, 0, 1, 0.1], [0, 0, 0, 1]])
# (segment id, raw box lo, raw box hi, RGB); the floor is a quad, the rest are boxes.
PARTS = [
    (11, (1.0, 1.0, 0.0), (1.5, 1.5, 0.45), (200, 40, 40)),  # chair seat
    (27, (1.0, 1.4, 0.45), (1.5, 1.5, 0.9), (170, 30, 30)),  # chair back
    (42, (2.0, 0.5, 0.0), (3.2, 1.3, 0.75), (120, 75, 40)),  # table
    (93, (3.5, 2.5, 0.0), (3.7, 2.7, 0.2), (60, 160, 70)),  # unlabelled clutter
]
FLOOR_SEGMENT = 58
GROUPS = [(0, "chair", [11, 27]), (1, "table", [42]), (2, "floor", [FLOOR_SEGMENT])]


def _box(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    bits = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])
    # Outward (counter-clockwise seen from outside) winding, as in ScanNet meshes.
    faces = [(0, 2, 3), (0, 3, 1), (4, 5, 7), (4, 7, 6), (0, 1, 5), (0, 5, 4),
             (2, 6, 7), (2, 7, 3), (0, 4, 6), (0, 6, 2), (1, 3, 7), (1, 7, 5)]  # fmt: skip
    return lo + bits * (hi - lo), np.array(faces)


def build_mesh():
    """Raw-frame mesh: vertices float32 [V,3], faces [F,3], colors uint8 [V,3], segment id per vertex."""
    vertices = [np.array([[0, 0, 0], [4, 0, 0], [4, 3, 0], [0, 3, 0]], float)]
    faces = [np.array([[0, 1, 2], [0, 2, 3]])]
    colors = [np.tile([128, 128, 128], (4, 1))]
    segments = [np.full(4, FLOOR_SEGMENT)]
    for segment, lo, hi, rgb in PARTS:
        v, f = _box(lo, hi)
        faces.append(f + sum(len(x) for x in vertices))
        vertices.append(v)
        colors.append(np.tile(rgb, (len(v), 1)))
        segments.append(np.full(len(v), segment))
    return (
        np.concatenate(vertices).astype(np.float32),
        np.concatenate(faces).astype(np.int32),
        np.concatenate(colors).astype(np.uint8),
        np.concatenate(segments).astype(int),
    )


def write_ply(path, vertices, faces, colors):
    """Binary little-endian PLY exactly as ScanNet's _vh_clean_2.ply (x y z float, RGBA uchar)."""
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment VCGLIB generated\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        for p, c in zip(vertices, colors):
            f.write(struct.pack("<fffBBBB", *p, *c, 255))
        for tri in faces:
            f.write(struct.pack("<Biii", 3, *tri))


def write_frames(out, vertices, faces, colors):
    width, height = 80, 60
    K = pinhole_K(width, height, 70.0).astype(np.float64)
    scene = Scene(SCENE_ID, vertices, faces, colors, np.full(len(vertices), -1, np.int32), [])
    raycaster = Raycaster(scene)
    cameras = [
        ((0.3, 2.8, 1.5), (2.2, 1.2, 0.5)),
        ((3.9, 2.9, 1.4), (1.8, 1.0, 0.4)),
        ((0.3, 0.3, 1.4), (2.0, 1.5, 0.3)),
    ]
    for folder in ("color", "depth", "pose", "intrinsic"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    for i, (eye, target) in enumerate(cameras):
        pose = look_at(eye, target).astype(np.float64)
        view = raycaster.render(pose, K, width, height)
        Image.fromarray(view["rgb"]).resize((2 * width, 2 * height), Image.NEAREST).save(
            os.path.join(out, "color", f"{i}.jpg"), quality=95
        )
        Image.fromarray(np.rint(view["depth"] * 1000).astype(np.uint16)).save(
            os.path.join(out, "depth", f"{i}.png")
        )
        if i == 2:
            pose = np.full((4, 4), -np.inf)
        np.savetxt(os.path.join(out, "pose", f"{i}.txt"), pose, fmt="%.6f")
    # ScanNet intrinsics put pixel centres on integer coordinates: cx, cy are 0.5 less than ours.
    depth_K = np.eye(4)
    depth_K[:3, :3] = K
    depth_K[:2, 2] -= 0.5
    color_K = depth_K.copy()
    color_K[:2, :3] *= 2
    np.savetxt(os.path.join(out, "intrinsic", "intrinsic_depth.txt"), depth_K, fmt="%.6f")
    np.savetxt(os.path.join(out, "intrinsic", "intrinsic_color.txt"), color_K, fmt="%.6f")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "scannet"))
    args = parser.parse_args()
    scan = os.path.join(args.out, SCENE_ID)
    os.makedirs(scan, exist_ok=True)
    vertices, faces, colors, segments = build_mesh()
    write_ply(os.path.join(scan, f"{SCENE_ID}_vh_clean_2.ply"), vertices, faces, colors)
    segs = {
        "params": {
            "kThresh": "0.0001",
            "segMinVerts": "20",
            "minPoints": "750",
            "maxPoints": "5000",
        },
        "sceneId": SCENE_ID,
        "segIndices": segments.tolist(),
    }
    with open(os.path.join(scan, f"{SCENE_ID}_vh_clean_2.0.010000.segs.json"), "w") as f:
        json.dump(segs, f)
    aggregation = {
        "sceneId": f"scannet.{SCENE_ID}",
        "appId": "Aggregator.v2",
        "segGroups": [
            {"id": i, "objectId": i, "segments": s, "label": label} for i, label, s in GROUPS
        ],
        "segmentsFile": f"scannet.{SCENE_ID}_vh_clean_2.0.010000.segs.json",
    }
    with open(os.path.join(scan, f"{SCENE_ID}.aggregation.json"), "w") as f:
        json.dump(aggregation, f)
    with open(os.path.join(scan, f"{SCENE_ID}.txt"), "w") as f:
        f.write("axisAlignment = " + " ".join(f"{x:g}" for x in AXIS_ALIGNMENT.ravel()) + "\n")
        f.write("colorHeight = 120\ncolorWidth = 160\ndepthHeight = 60\ndepthWidth = 80\n")
        f.write("numColorFrames = 3\nnumDepthFrames = 3\nsceneType = Living room / Lounge\n")
    write_frames(os.path.join(scan, "frames"), vertices, faces, colors)
    print(f"wrote {scan}")


if __name__ == "__main__":
    main()
