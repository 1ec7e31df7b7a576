"""Headless multi-view RGB-D + instance renders of a `Scene` with open3d's CPU ray caster.

Camera convention (OpenCV): camera x right, y down, z forward. Pixel (row v, column u) is the ray
through the continuous image point (u + 0.5, v + 0.5): `d_cam = K^-1 [u + 0.5, v + 0.5, 1]`,
and its 3D point is `depth[v, u] * d_cam` (z-depth). `backproject` is that formula, and the
renderer casts exactly those rays (with d_cam's z = 1, the hit distance is the z-depth).

    python -m data_pipeline.render --scenes SCENES --out VIEWS [--views 8 --width 320 --height 240 --seed 0]

writes VIEWS/<scene_id>.npz (the `Views` file of docs/architecture.md) and VIEWS/<scene_id>.png
(contact sheet: rgb, depth and instance rows). A scene that fails is reported and skipped.

    python -m data_pipeline.render --rgbd FRAMES --out VIEWS [--scene-id ID --align SCENE.txt --frame-step N]

turns a real RGB-D sequence in ScanNet's export layout into the same views file.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import os
import re
import sys
import warnings
import zlib

import numpy as np
import open3d as o3d
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_pipeline.scenes.scannet import read_axis_alignment
from data_pipeline.scenes.scene import Scene
from llm3d_jax.fileio import (
    InputError,
    child_path,
    cli_main,
    load_npz,
    name_problem,
    output_folder,
    save_npz_atomic,
    write_bytes_atomic,
    writing,
)

VIEW_KEYS = ("rgb", "depth", "instance", "normals", "K", "cam_to_world", "scene_id")
# A requested camera closer than this to the mesh is touching it; sampled cameras keep more room.
TOUCH_DISTANCE = 0.02
SAMPLED_CLEARANCE = 0.3


@dataclasses.dataclass
class Views:
    """V rendered (or captured) views of one scene.

    rgb uint8 [V,H,W,3]; depth float32 [V,H,W] z-depth in metres, 0 where nothing was hit;
    instance int32 [V,H,W] object id of the hit, -1 for structure / nothing; normals float32
    [V,H,W,3] world-frame unit normals facing the camera, 0 where nothing; K float32 [V,3,3];
    cam_to_world float32 [V,4,4].
    """

    scene_id: str
    rgb: np.ndarray
    depth: np.ndarray
    instance: np.ndarray
    normals: np.ndarray
    K: np.ndarray
    cam_to_world: np.ndarray

    def save(self, directory: str | os.PathLike) -> str:
        path = child_path(directory, self.scene_id, ".npz")
        save_npz_atomic(path, **self._arrays())
        return path

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "rgb": np.asarray(self.rgb, np.uint8),
            "depth": np.asarray(self.depth, np.float32),
            "instance": np.asarray(self.instance, np.int32),
            "normals": np.asarray(self.normals, np.float32),
            "K": np.asarray(self.K, np.float32),
            "cam_to_world": np.asarray(self.cam_to_world, np.float32),
            "scene_id": np.array(self.scene_id),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Views:
        data = load_npz(path, required=VIEW_KEYS)
        depth = data["depth"]
        if depth.ndim != 3:
            raise InputError(path, f"depth must be [V,H,W], got shape {depth.shape}")
        v, h, w = depth.shape
        expected = {
            "rgb": (v, h, w, 3),
            "instance": (v, h, w),
            "normals": (v, h, w, 3),
            "K": (v, 3, 3),
            "cam_to_world": (v, 4, 4),
        }
        for key, shape in expected.items():
            if data[key].shape != shape:
                raise InputError(path, f"{key} has shape {data[key].shape}, expected {shape}")
        scene_id = str(data["scene_id"])
        if name_problem(scene_id):  # it names the files written for these views
            raise InputError(path, f"scene_id {scene_id!r:.80} {name_problem(scene_id)}")
        return cls(scene_id=scene_id, **{k: data[k] for k in expected}, depth=depth)


# ---------------------------------------------------------------- cameras
def pinhole_K(width: int, height: int, fov_deg: float) -> np.ndarray:
    """float32 [3,3] with horizontal field of view `fov_deg`, square pixels, centred principal point."""
    f = (width / 2) / np.tan(np.radians(fov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float32)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """float32 [4,4] camera-to-world of an OpenCV camera at `eye` looking at `target`."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-6:
        raise ValueError(f"look_at: viewing direction {forward} is parallel to up {up}")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose.astype(np.float32)


def backproject(depth: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """World points of every pixel: depth [...,H,W], K [...,3,3], cam_to_world [...,4,4] -> [...,H,W,3].

    Pixel (v, u) maps to `cam_to_world @ (depth[v,u] * K^-1 [u + 0.5, v + 0.5, 1])`. Pixels with
    depth 0 (no hit) land on the camera centre: select `depth > 0` to drop them.
    """
    depth = np.asarray(depth, np.float64)
    h, w = depth.shape[-2:]
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)  # [H,W,3]
    rays = np.einsum("...ij,hwj->...hwi", np.linalg.inv(np.asarray(K, np.float64)), pixels)
    cam = depth[..., None] * rays
    pose = np.asarray(cam_to_world, np.float64)
    world = np.einsum("...ij,...hwj->...hwi", pose[..., :3, :3], cam) + pose[..., None, None, :3, 3]
    return world.astype(np.float32)


def pixel_rays(K: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame ray of every pixel, row-major: [H*W,3] = K^-1 [u + 0.5, v + 0.5, 1] (z = 1)."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1).reshape(-1, 3)
    # einsum, not `@`: a threaded BLAS call on [N,3] x [3,3] fights open3d's threads for the cores.
    return np.einsum("ij,nj->ni", np.linalg.inv(np.asarray(K, np.float64)), pixels)


def _fibonacci_directions(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5**0.5) * k
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1).astype(np.float32)


_PROBES = _fibonacci_directions(64)
# Camera-frame rays through the middle of a view: the centre and four at about 2 degrees.
_SIGHT = np.array([[0, 0, 1], [0.035, 0, 1], [-0.035, 0, 1], [0, 0.035, 1], [0, -0.035, 1]])


class Raycaster:
    """One scene's mesh in an open3d RaycastingScene, plus what turns a hit into pixels."""

    def __init__(self, scene: Scene):
        scene.validate()
        self.scene = scene
        self._corner_colors = np.asarray(scene.colors, np.float32)[scene.faces]  # [F,3,3]
        self._corner_instance = np.asarray(scene.instance, np.int32)[scene.faces]  # [F,3]
        self._bounds = np.stack([scene.vertices.min(axis=0), scene.vertices.max(axis=0)])
        self._rc = o3d.t.geometry.RaycastingScene()
        self._rc.add_triangles(
            o3d.core.Tensor(np.ascontiguousarray(scene.vertices, np.float32)),
            o3d.core.Tensor(np.ascontiguousarray(scene.faces, np.uint32)),
        )

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> dict[str, np.ndarray]:
        """Rays [N,3] + [N,3] -> t [N] (inf on a miss, in units of the direction's length),
        rgb [N,3] uint8, instance [N] int32, normal [N,3] facing the ray's origin, hit [N] bool."""
        rays = np.concatenate([origins, directions], axis=1).astype(np.float32)
        out = {k: v.numpy() for k, v in self._rc.cast_rays(o3d.core.Tensor(rays)).items()}
        t = out["t_hit"]
        hit = np.isfinite(t)
        prim = np.where(hit, out["primitive_ids"], 0)
        u, v = out["primitive_uvs"].T
        # Barycentric weights of the hit point: p = (1 - u - v) p0 + u p1 + v p2.
        weights = np.stack([1 - u - v, u, v], axis=1)
        rgb = np.einsum("nk,nkc->nc", weights, self._corner_colors[prim])
        # A triangle whose corners disagree belongs to the object of the corner nearest the hit.
        nearest = np.argmax(weights, axis=1)[:, None]
        instance = np.take_along_axis(self._corner_instance[prim], nearest, axis=1)[:, 0]
        instance = np.where(hit, instance, -1).astype(np.int32)
        normal = out["primitive_normals"]
        facing = np.einsum("ni,ni->n", normal, rays[:, 3:]) > 0
        normal = np.where(facing[:, None], -normal, normal)
        normal[~hit] = 0.0
        # A convex combination of uint8 colours stays within 0..255.
        rgb = np.where(hit[:, None], np.rint(rgb), 0).astype(np.uint8)
        return {"t": t, "rgb": rgb, "instance": instance, "normal": normal, "hit": hit}

    def camera_problem(self, eye: np.ndarray, clearance: float = TOUCH_DISTANCE) -> str | None:
        """Why a camera at `eye` is inside geometry (None if it is not).

        Too close to the mesh is touching it. Inside a closed surface most probe rays hit the
        back of triangles; outside the mesh's bounding box nothing can enclose the camera (and an
        open mesh seen from behind is no reason to refuse it).
        """
        eye = np.asarray(eye, np.float32).reshape(1, 3)
        distance = float(self._rc.compute_distance(o3d.core.Tensor(eye)).numpy()[0])
        where = "(" + ", ".join(f"{x:.3f}" for x in eye[0]) + ")"
        if distance < clearance:
            return (
                f"camera at {where} is {distance:.3f} m from the mesh (inside or touching geometry)"
            )
        if (eye[0] < self._bounds[0]).any() or (eye[0] > self._bounds[1]).any():
            return None
        rays = np.concatenate([np.repeat(eye, len(_PROBES), 0), _PROBES], axis=1)
        out = self._rc.cast_rays(o3d.core.Tensor(rays))
        hit = np.isfinite(out["t_hit"].numpy())
        back = np.einsum("ni,ni->n", out["primitive_normals"].numpy(), _PROBES) > 0
        if hit.any() and (back & hit).sum() > 0.5 * hit.sum():
            return f"camera at {where} is inside geometry (most rays hit the back of surfaces)"
        return None

    def render(
        self, cam_to_world: np.ndarray, K: np.ndarray, width: int, height: int
    ) -> dict[str, np.ndarray]:
        """One view: rgb [H,W,3], depth [H,W], instance [H,W], normals [H,W,3]."""
        pose = np.asarray(cam_to_world, np.float64)
        directions = np.einsum("ij,nj->ni", pose[:3, :3], pixel_rays(K, width, height))
        out = self.cast(np.broadcast_to(pose[:3, 3], directions.shape), directions)
        # d_cam has z = 1, so t along it is the z-depth.
        depth = np.where(out["hit"], out["t"], 0.0).astype(np.float32)
        return {
            "rgb": out["rgb"].reshape(height, width, 3),
            "depth": depth.reshape(height, width),
            "instance": out["instance"].reshape(height, width),
            "normals": out["normal"].astype(np.float32).reshape(height, width, 3),
        }


def render_views(
    scene: Scene,
    cam_to_world: np.ndarray,
    K: np.ndarray,
    width: int,
    height: int,
    raycaster: Raycaster | None = None,
    where: str | None = None,
) -> Views:
    """Renders views from given cameras [V,4,4] with K [3,3] or [V,3,3].

    A camera inside geometry is an InputError naming `where` (default: the scene id).
    """
    raycaster = raycaster or Raycaster(scene)
    cam_to_world = np.asarray(cam_to_world, np.float32).reshape(-1, 4, 4)
    K = np.broadcast_to(np.asarray(K, np.float32), (len(cam_to_world), 3, 3))
    frames = []
    for k, pose in enumerate(cam_to_world):
        problem = raycaster.camera_problem(pose[:3, 3])
        if problem:
            raise InputError(where or scene.scene_id, f"view {k}: {problem}")
        frames.append(raycaster.render(pose, K[k], width, height))
    return Views(
        scene_id=scene.scene_id,
        **{
            key: np.stack([f[key] for f in frames])
            for key in ("rgb", "depth", "instance", "normals")
        },
        K=np.array(K),
        cam_to_world=cam_to_world,
    )


def room_cameras(raycaster: Raycaster, num_views: int, rng: np.random.Generator) -> np.ndarray:
    """[V,4,4] cameras at eye height inside the room, each looking at an object (cycled in random order).

    Cameras stay `SAMPLED_CLEARANCE` away from every surface and outside every object; a
    camera is kept only if 4 of 5 rays around the middle of its view hit the object it looks at
    (after many failed tries, any free camera looking towards the object is kept).
    """
    scene = raycaster.scene
    room = np.array(
        scene.meta.get("room") or [*scene.vertices.min(0), *scene.vertices.max(0)], np.float64
    )
    lo, hi = room[:3], room[3:]
    margin = np.minimum(0.4, (hi[:2] - lo[:2]) / 4)
    targets = [o for o in scene.objects if (scene.instance[scene.faces[:, 0]] == o.id).any()]
    corners = scene.vertices[scene.faces].astype(np.float64)  # [F,3,3]
    face_instance = scene.instance[scene.faces[:, 0]]
    object_surfaces = {}
    for o in targets:
        tris = corners[face_instance == o.id]
        area = np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
        object_surfaces[o.id] = (tris, np.cumsum(area))
    order = rng.permutation(len(targets)) if targets else []
    poses = []
    for view in range(num_views):
        obj = targets[order[view % len(order)]] if targets else None
        pose = None
        for attempt in range(400):
            eye = np.array(
                [*rng.uniform(lo[:2] + margin, hi[:2] - margin), lo[2] + rng.uniform(1.2, 1.7)]
            )
            if obj is not None:
                # Aim at a random point of the object's surface (area-weighted): a box centre
                # can be empty space (a chair's seat gap) or a part too thin to see (a lamp pole).
                tris, cdf = object_surfaces[obj.id]
                a, b = rng.random(2)
                if a + b > 1:
                    a, b = 1 - a, 1 - b
                tri = tris[np.searchsorted(cdf, rng.random() * cdf[-1])]
                target = tri[0] + a * (tri[1] - tri[0]) + b * (tri[2] - tri[0])
            else:
                target = (lo + hi) / 2 * np.array([1, 1, 0]) + np.array([0, 0, lo[2] + 0.8])
            direction = (target - eye) / np.linalg.norm(target - eye)
            if abs(direction[2]) > 0.9:
                continue
            # Early tries insist on standing back a little, so a view shows the object's context.
            if attempt < 200 and np.linalg.norm((target - eye)[:2]) < 1.2:
                continue
            if raycaster.camera_problem(eye, SAMPLED_CLEARANCE):
                continue
            candidate = look_at(eye, target)
            if obj is not None and attempt < 300:
                # The object must fill the middle of the view, not just a thin part on one ray.
                sight = raycaster.cast(
                    np.repeat(eye[None], len(_SIGHT), 0), _SIGHT @ candidate[:3, :3].T
                )
                if (sight["instance"] == obj.id).sum() < 4:
                    continue
            pose = candidate
            break
        if pose is None:
            raise InputError(
                scene.scene_id, "found no camera position inside the room and outside geometry"
            )
        poses.append(pose)
    return np.stack(poses)


def orbit_cameras(
    raycaster: Raycaster,
    box: np.ndarray,
    num_views: int,
    K: np.ndarray,
    width: int,
    height: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """[V,4,4] cameras on a circle around `box` (an AABB [6]), 15 to 40 degrees above it, the whole
    box in view; in a room, a camera that would sit in geometry or outside the room moves closer."""
    room = raycaster.scene.meta.get("room")
    room_lo, room_hi = (np.array(room[:3]), np.array(room[3:])) if room else (-np.inf, np.inf)
    centre = (box[:3] + box[3:]) / 2
    radius = max(float(np.linalg.norm(box[3:] - box[:3])) / 2, 1e-3)
    half_fov = min(np.arctan(width / 2 / K[0, 0]), np.arctan(height / 2 / K[1, 1]))
    distance = 1.1 * radius / np.sin(half_fov)
    poses = []
    for view in range(num_views):
        azimuth = 2 * np.pi * (view + rng.uniform(-0.2, 0.2)) / num_views
        elevation = np.radians(rng.uniform(15, 40))
        pose = None
        # Blocked (a wall, a shelf next to the object): come closer, then turn a little, then
        # look from higher up.
        candidates = (
            (d, azimuth + turn, lift)
            for d in distance * 0.85 ** np.arange(10)
            if d > 1.05 * radius
            for turn in np.pi / 8 * np.array([0, 1, -1, 2, -2])
            for lift in (elevation, np.radians(60))
        )
        for d, az, el in candidates:
            eye = centre + d * np.array(
                [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)]
            )
            in_room = np.all((eye > room_lo) & (eye < room_hi))
            if in_room and raycaster.camera_problem(eye, min(SAMPLED_CLEARANCE, 0.2 * d)) is None:
                pose = look_at(eye, centre)
                break
        if pose is None:
            raise InputError(
                raycaster.scene.scene_id, f"no free camera position for orbit view {view}"
            )
        poses.append(pose)
    return np.stack(poses)


def render_scene(
    scene: Scene,
    num_views: int = 8,
    width: int = 320,
    height: int = 240,
    seed: int = 0,
    fov_deg: float = 80.0,
    mode: str = "auto",
    object_id: int | None = None,
) -> Views:
    """Samples cameras and renders. mode: `room` (eye-height views inside the room), `orbit`
    (around object `object_id`, or the whole mesh), `auto` (room when the scene has a room extent).
    The cameras depend only on (scene id, seed)."""
    raycaster = Raycaster(scene)
    K = pinhole_K(width, height, fov_deg)
    rng = np.random.default_rng([seed, zlib.crc32(scene.scene_id.encode())])
    if mode == "auto":
        mode = "room" if "room" in scene.meta and object_id is None else "orbit"
    if mode == "room":
        poses = room_cameras(raycaster, num_views, rng)
    elif mode == "orbit":
        if object_id is None:
            box = np.concatenate([scene.vertices.min(0), scene.vertices.max(0)])
        else:
            found = [o.box for o in scene.objects if o.id == object_id]
            if not found:
                raise InputError(scene.scene_id, f"no object with id {object_id}")
            box = found[0]
        poses = orbit_cameras(
            raycaster, np.asarray(box, np.float64), num_views, K, width, height, rng
        )
    else:
        raise ValueError(f"unknown camera mode {mode!r}")
    return render_views(scene, poses, K, width, height, raycaster=raycaster)


# ---------------------------------------------------------------- real RGB-D sequences
def _read_matrix(path: str, shape=(4, 4)) -> np.ndarray:
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except ValueError as err:
        raise InputError(path, f"not a whitespace-separated matrix ({err})") from None
    if matrix.shape != shape:
        raise InputError(path, f"expected a {shape[0]}x{shape[1]} matrix, got shape {matrix.shape}")
    return matrix


def _depth_normals(points: np.ndarray, valid: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """Unit normals [H,W,3] from neighbour cross products of a point map, facing `eye`; 0 at edges."""
    normals = np.zeros_like(points)
    dx = points[1:-1, 2:] - points[1:-1, :-2]
    dy = points[2:, 1:-1] - points[:-2, 1:-1]
    n = np.cross(dx, dy)
    ok = valid[1:-1, 2:] & valid[1:-1, :-2] & valid[2:, 1:-1] & valid[:-2, 1:-1] & valid[1:-1, 1:-1]
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    ok &= length[..., 0] > 0
    n = np.where(ok[..., None], n / np.maximum(length, 1e-12), 0.0)
    flip = np.einsum("hwi,hwi->hw", n, points[1:-1, 1:-1] - eye) > 0
    normals[1:-1, 1:-1] = np.where(flip[..., None], -n, n)
    return normals


def read_scannet_frames(
    frames_dir: str,
    scene_id: str | None = None,
    frame_step: int = 1,
    max_frames: int | None = None,
    axis_alignment: np.ndarray | None = None,
) -> Views:
    """Reads a ScanNet RGB-D export (color/<i>.jpg, depth/<i>.png in mm, pose/<i>.txt
    camera-to-world, intrinsic/intrinsic_depth.txt) into `Views` at the depth resolution.

    Colour is resized to the depth size. ScanNet intrinsics put pixel centres on integers, so
    cx, cy move by +0.5 into our convention. Frames with a non-finite pose (ScanNet marks lost
    tracking with -inf) are skipped with a warning. `axis_alignment` [4,4], when given, maps the
    poses into the aligned scene frame. Instance ids are unknown (-1); normals come from the depth.
    """
    depth_files = glob.glob(os.path.join(frames_dir, "depth", "*.png"))
    if not depth_files:
        raise InputError(frames_dir, "no depth/*.png frames (expected a ScanNet RGB-D export)")
    frame_ids = sorted(
        int(m.group(1))
        for f in depth_files
        if (m := re.fullmatch(r"(\d+)\.png", os.path.basename(f)))
    )
    frame_ids = frame_ids[::frame_step][:max_frames]
    K = _read_matrix(os.path.join(frames_dir, "intrinsic", "intrinsic_depth.txt"))[:3, :3].copy()
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    align = np.eye(4) if axis_alignment is None else np.asarray(axis_alignment, np.float64)
    rgbs, depths, normals, poses = [], [], [], []
    for i in frame_ids:
        pose_path = os.path.join(frames_dir, "pose", f"{i}.txt")
        pose = _read_matrix(pose_path)
        if not np.isfinite(pose).all():
            warnings.warn(f"{pose_path}: non-finite pose, frame skipped", stacklevel=2)
            continue
        depth_path = os.path.join(frames_dir, "depth", f"{i}.png")
        color_path = os.path.join(frames_dir, "color", f"{i}.jpg")
        try:
            with Image.open(depth_path) as im:
                depth_mm = np.array(im)
        except OSError as err:
            raise InputError(depth_path, f"not a readable PNG ({err})") from None
        if depth_mm.ndim != 2:
            raise InputError(
                depth_path, f"depth must be a single-channel 16-bit PNG, got shape {depth_mm.shape}"
            )
        h, w = depth_mm.shape
        if not os.path.exists(color_path):
            raise InputError(color_path, "file not found")
        try:
            with Image.open(color_path) as im:
                rgb = np.array(im.convert("RGB").resize((w, h), Image.BILINEAR))
        except OSError as err:
            raise InputError(color_path, f"not a readable JPEG ({err})") from None
        depth = depth_mm.astype(np.float32) / 1000.0
        pose = align @ pose
        world = backproject(depth, K, pose)
        normals.append(
            _depth_normals(world.astype(np.float64), depth > 0, pose[:3, 3]).astype(np.float32)
        )
        rgbs.append(rgb)
        depths.append(depth)
        poses.append(pose.astype(np.float32))
    if not poses:
        raise InputError(frames_dir, "no frame with a valid pose")
    n, (h, w) = len(poses), depths[0].shape
    return Views(
        scene_id=scene_id or os.path.basename(os.path.normpath(frames_dir)),
        rgb=np.stack(rgbs),
        depth=np.stack(depths),
        instance=np.full((n, h, w), -1, np.int32),
        normals=np.stack(normals),
        K=np.broadcast_to(K.astype(np.float32), (n, 3, 3)).copy(),
        cam_to_world=np.stack(poses),
    )


# ---------------------------------------------------------------- contact sheet
def _colorize_depth(depth: np.ndarray) -> np.ndarray:
    import matplotlib

    valid = depth > 0
    top = np.percentile(depth[valid], 99) if valid.any() else 1.0
    rgb = matplotlib.colormaps["turbo"](np.clip(depth / max(top, 1e-6), 0, 1))[..., :3]
    return np.where(valid[..., None], rgb * 255, 0).astype(np.uint8)


def _colorize_instance(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """One tab20 colour per object id; structure dark gray, no hit black."""
    import matplotlib

    palette = (np.array(matplotlib.colormaps["tab20"].colors) * 255).astype(np.uint8)
    rgb = palette[np.mod(instance, len(palette))]
    rgb = np.where(instance[..., None] >= 0, rgb, 60)
    return np.where(depth[..., None] > 0, rgb, 0).astype(np.uint8)


def contact_sheet_png(views: Views, thumb_width: int = 240) -> bytes:
    """PNG bytes: one column per view; rows rgb, depth (turbo, black = no hit), instance
    (a colour per object, dark gray = structure)."""
    v, h, w = views.depth.shape
    tw = min(thumb_width, w)
    th = max(1, round(h * tw / w))
    label_w, title_h = 70, 18
    sheet = Image.new("RGB", (label_w + v * tw, title_h + 3 * th), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"{views.scene_id}: {v} views {w}x{h}", fill=(0, 0, 0))
    rows = [
        ("rgb", views.rgb),
        ("depth", _colorize_depth(views.depth)),
        ("instance", _colorize_instance(views.instance, views.depth)),
    ]
    for r, (name, images) in enumerate(rows):
        draw.text((4, title_h + r * th + th // 2 - 6), name, fill=(0, 0, 0))
        for c in range(v):
            thumb = Image.fromarray(images[c]).resize((tw, th), Image.NEAREST)
            sheet.paste(thumb, (label_w + c * tw, title_h + r * th))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def save_contact_sheet(views: Views, path: str | os.PathLike) -> None:
    """Writes the contact sheet PNG atomically."""
    write_bytes_atomic(path, contact_sheet_png(views))


# ---------------------------------------------------------------- command line
def _read_cameras(path: str) -> np.ndarray:
    """`[{"eye": [x, y, z], "target": [x, y, z]}, ...]` -> camera-to-world [V,4,4]."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(path, 'expected a non-empty list of {"eye": [x,y,z], "target": [x,y,z]}')
    cameras = []
    for k, row in enumerate(rows):
        try:
            eye, target = np.asarray(row["eye"], float), np.asarray(row["target"], float)
        except (TypeError, KeyError, ValueError):
            raise InputError(
                path, f'camera {k}: needs "eye" and "target", each [x, y, z]'
            ) from None
        if eye.shape != (3,) or target.shape != (3,) or np.allclose(eye, target):
            raise InputError(
                path, f"camera {k}: eye and target must be two different [x, y, z] points"
            )
        try:
            cameras.append(look_at(eye, target))
        except ValueError:
            raise InputError(
                path, f"camera {k}: looks straight up or down (undefined roll)"
            ) from None
    return np.stack(cameras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", help="folder of scene .npz files (or one file)")
    source.add_argument(
        "--rgbd", help="a ScanNet RGB-D export (color/ depth/ pose/ intrinsic/) to turn into views"
    )
    parser.add_argument(
        "--out", required=True, help="folder for <scene_id>.npz views and .png sheets"
    )
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fov", type=float, default=80.0, help="horizontal field of view, degrees")
    parser.add_argument("--mode", choices=("auto", "room", "orbit"), default="auto")
    parser.add_argument(
        "--cameras",
        help='JSON [{"eye": [x,y,z], "target": [x,y,z]}, ...]: render these instead of sampling',
    )
    parser.add_argument("--scene-id", help="--rgbd: scene id (default: the folder name)")
    parser.add_argument("--align", help="--rgbd: the scan's <scene_id>.txt with its axisAlignment")
    parser.add_argument("--frame-step", type=int, default=1, help="--rgbd: keep every n-th frame")
    args = parser.parse_args(argv)
    if args.views < 1 or args.width < 2 or args.height < 2 or args.frame_step < 1:
        raise InputError(None, "--views, --frame-step must be >= 1 and --width/--height >= 2")
    if args.rgbd:
        align = read_axis_alignment(args.align) if args.align else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            views = read_scannet_frames(
                args.rgbd, args.scene_id, args.frame_step, axis_alignment=align
            )
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        sheet = contact_sheet_png(views)
        output_folder(args.out)
        with writing(args.out):
            views.save(args.out)
            write_bytes_atomic(child_path(args.out, views.scene_id, ".png"), sheet)
        print(f"wrote {len(views.depth)} frames of {views.scene_id} into {args.out}")
        return 0
    if os.path.isdir(args.scenes):
        paths = sorted(glob.glob(os.path.join(args.scenes, "*.npz")))
    elif os.path.isfile(args.scenes):
        paths = [args.scenes]
    else:
        raise InputError(args.scenes, "not found")
    if not paths:
        raise InputError(args.scenes, "no .npz scene files")
    cameras = _read_cameras(args.cameras) if args.cameras else None
    output_folder(args.out)
    failed = 0
    for path in tqdm(paths, desc="render", unit="scene", disable=None):
        try:
            scene = Scene.load(path)
            if cameras is None:
                views = render_scene(
                    scene, args.views, args.width, args.height, args.seed, args.fov, args.mode
                )
            else:
                K = pinhole_K(args.width, args.height, args.fov)
                views = render_views(
                    scene,
                    cameras,
                    K,
                    args.width,
                    args.height,
                    where=f"{args.cameras} (scene {path})",
                )
            sheet = contact_sheet_png(views)
            with writing(args.out):
                views.save(args.out)
                write_bytes_atomic(child_path(args.out, views.scene_id, ".png"), sheet)
        except InputError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failed += 1
    print(f"rendered {len(paths) - failed} of {len(paths)} scenes into {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
