"""Procedural rooms: a tiled floor, four walls and 3 to 15 furniture objects with exact boxes.

Every object category is a distinct composite of boxes, cylinders, frustums and spheres, painted
in one named colour from `COLORS` (accent parts a darker shade of it), and rests either on the
floor or on top of a table / cabinet. Footprints never overlap. A scene is a pure function of
`(seed, index)`, and its file is byte-identical for the same pair.

    python -m data_pipeline.scenes.synthetic --num-scenes N --seed S --out DIR   # DIR/synth_0000.npz ...

With --objects each scene is one object alone (no floor, no walls), centred on the origin and
resting on z = 0: the object-level scenes of 3D-LLM's Objaverse data (`make_object_scene`,
DIR/synth_obj_0000.npz ..., meta "level": "object"; rendered from an orbit).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from tqdm import tqdm

from data_pipeline.scenes.scene import Scene, SceneObject, boxes_from_instances
from llm3d_jax.fileio import InputError, cli_main, output_folder, writing

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (230, 200, 40),
    "green": (60, 160, 70),
    "dark green": (30, 90, 40),
    "olive": (120, 130, 50),
    "teal": (30, 140, 140),
    "blue": (40, 80, 200),
    "navy": (25, 35, 100),
    "purple": (120, 60, 160),
    "pink": (230, 120, 170),
    "brown": (120, 75, 40),
    "beige": (215, 195, 155),
    "white": (235, 235, 230),
    "gray": (128, 128, 128),
    "black": (35, 35, 35),
}
# Colours an object of the category may take; a category not listed takes any colour.
CATEGORY_COLORS = {"plant": ("green", "dark green", "olive")}
FLOOR_COLORS = ("brown", "beige", "gray")
WALL_COLORS = ("white", "beige", "gray")
# Categories that can sit on a support, and the categories that can carry them.
SMALL = ("box", "ball", "lamp", "plant", "monitor")
SUPPORTS = ("table", "cabinet")
# Light direction baked into the vertex colours (flat shading), so renders show 3D shape.
_LIGHT = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])
_ACCENT = 0.6  # accent parts (legs, doors, pot) are this much darker than the object colour


# ---------------------------------------------------------------- primitives (convex meshes)
def _outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flips faces of a convex mesh so every normal points away from its centre."""
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("fi,fi->f", normal, tri.mean(axis=1) - vertices.mean(axis=0)) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, ::-1]
    return faces


def box(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned box from corner `lo` to corner `hi`: vertices [8,3], faces [12,3]."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    bits = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)])
    vertices = lo + bits * (hi - lo)
    quads = [(0, 2, 3, 1), (4, 5, 7, 6), (0, 1, 5, 4), (2, 6, 7, 3), (0, 4, 6, 2), (1, 3, 7, 5)]
    faces = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return vertices, _outward(vertices, faces)


def frustum(center, r_bottom, r_top, z0, z1, segments=16) -> tuple[np.ndarray, np.ndarray]:
    """Closed truncated cone around the vertical axis through `center` (a cylinder when radii match)."""
    a = 2 * np.pi * np.arange(segments) / segments
    ring = np.stack([np.cos(a), np.sin(a)], axis=1)
    cx, cy = center
    bottom = np.column_stack(
        [cx + r_bottom * ring[:, 0], cy + r_bottom * ring[:, 1], np.full(segments, z0)]
    )
    top = np.column_stack([cx + r_top * ring[:, 0], cy + r_top * ring[:, 1], np.full(segments, z1)])
    vertices = np.concatenate([bottom, top, [[cx, cy, z0], [cx, cy, z1]]])
    i = np.arange(segments)
    j = (i + 1) % segments
    n = segments
    faces = np.concatenate(
        [
            np.stack([i, j, n + i], 1),
            np.stack([j, n + j, n + i], 1),
            np.stack([np.full(n, 2 * n), j, i], 1),
            np.stack([np.full(n, 2 * n + 1), n + i, n + j], 1),
        ]
    )
    return vertices, _outward(vertices, faces)


def sphere(center, radius, rings=8, segments=12) -> tuple[np.ndarray, np.ndarray]:
    """UV sphere: `rings - 1` latitude rings of `segments` vertices plus two poles."""
    theta = np.pi * np.arange(1, rings) / rings
    phi = 2 * np.pi * np.arange(segments) / segments
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring_pts = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(
        -1, 3
    )
    unit = np.concatenate([[[0, 0, 1]], ring_pts, [[0, 0, -1]]])
    vertices = np.asarray(center, float) + radius * unit
    faces = []
    last = len(unit) - 1
    for s in range(segments):
        s1 = (s + 1) % segments
        faces.append((0, 1 + s, 1 + s1))
        base = 1 + (rings - 2) * segments
        faces.append((last, base + s1, base + s))
        for r in range(rings - 2):
            a, b = 1 + r * segments + s, 1 + r * segments + s1
            faces += [(a, a + segments, b), (b, a + segments, b + segments)]
    return vertices, _outward(vertices, np.array(faces))


# ---------------------------------------------------------------- categories
# Each builder returns parts in a local frame: footprint centred on (0, 0), resting on z = 0.
# A part is (vertices, faces, shade) with shade 1.0 for the object colour, _ACCENT for accents.
def _table(rng, small):
    length, width, height = rng.uniform(0.8, 1.8), rng.uniform(0.6, 1.0), rng.uniform(0.68, 0.78)
    parts = [(*box((-length / 2, -width / 2, height - 0.04), (length / 2, width / 2, height)), 1.0)]
    for sx in (-1, 1):
        for sy in (-1, 1):
            leg = (sx * (length / 2 - 0.07), sy * (width / 2 - 0.07))
            parts.append((*frustum(leg, 0.03, 0.03, 0.0, height - 0.04, 8), _ACCENT))
    return parts


def _chair(rng, small):
    side, seat = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48)
    back = seat + rng.uniform(0.35, 0.5)
    h = side / 2
    parts = [(*box((-h, -h, seat - 0.05), (h, h, seat)), 1.0)]
    parts.append((*box((-h, h - 0.05, seat), (h, h, back)), 1.0))
    for sx in (-1, 1):
        for sy in (-1, 1):
            x, y = sx * (h - 0.03), sy * (h - 0.03)
            parts.append(
                (*box((x - 0.02, y - 0.02, 0.0), (x + 0.02, y + 0.02, seat - 0.05)), _ACCENT)
            )
    return parts


def _bed(rng, small):
    length, width = rng.uniform(1.9, 2.1), rng.uniform(0.9, 1.8)
    lx, wy = length / 2, width / 2
    board = rng.uniform(0.9, 1.1)
    return [
        (*box((-lx, -wy, 0.0), (lx, wy, 0.3)), _ACCENT),
        (*box((-lx + 0.05, -wy + 0.03, 0.3), (lx - 0.02, wy - 0.03, 0.5)), 1.0),
        (*box((lx - 0.02, -wy, 0.0), (lx + 0.05, wy, board)), _ACCENT),
        (*box((lx - 0.45, -wy + 0.1, 0.5), (lx - 0.1, wy - 0.1, 0.62)), 1.0),
    ]


def _sofa(rng, small):
    length, depth = rng.uniform(1.4, 2.2), rng.uniform(0.8, 0.95)
    lx, dy = length / 2, depth / 2
    back, arm = rng.uniform(0.8, 0.9), 0.18
    return [
        (*box((-lx, -dy, 0.0), (lx, dy, 0.42)), 1.0),
        (*box((-lx, dy - 0.2, 0.42), (lx, dy, back)), 1.0),
        (*box((-lx, -dy, 0.42), (-lx + arm, dy - 0.2, 0.6)), _ACCENT),
        (*box((lx - arm, -dy, 0.42), (lx, dy - 0.2, 0.6)), _ACCENT),
    ]


def _cabinet(rng, small):
    width, depth, height = rng.uniform(0.5, 1.2), rng.uniform(0.4, 0.6), rng.uniform(0.6, 1.2)
    wx, dy = width / 2, depth / 2
    parts = [
        (*box((-wx, -dy + 0.02, 0.0), (wx, dy, height - 0.03)), 1.0),
        (*box((-wx, -dy, height - 0.03), (wx, dy, height)), 1.0),  # top covers the footprint
    ]
    for side in (-1, 1):
        door = (min(0, side) * (wx - 0.02), max(0, side) * (wx - 0.02))
        parts.append(
            (
                *box((door[0] + 0.01, -dy, 0.05), (door[1] - 0.01, -dy + 0.02, height - 0.06)),
                _ACCENT,
            )
        )
    return parts


def _shelf(rng, small):
    width, depth, height = rng.uniform(0.6, 1.2), rng.uniform(0.25, 0.4), rng.uniform(1.2, 2.0)
    wx, dy = width / 2, depth / 2
    parts = [
        (*box((-wx, -dy, 0.0), (-wx + 0.03, dy, height)), 1.0),
        (*box((wx - 0.03, -dy, 0.0), (wx, dy, height)), 1.0),
        (*box((-wx + 0.03, dy - 0.02, 0.0), (wx - 0.03, dy, height)), _ACCENT),
    ]
    boards = int(rng.integers(3, 6))
    for z in np.linspace(0.0, height - 0.03, boards):
        parts.append((*box((-wx + 0.03, -dy, z), (wx - 0.03, dy - 0.02, z + 0.03)), 1.0))
    return parts


def _box(rng, small):
    lo, hi = (0.1, 0.3) if small else (0.25, 0.6)
    sx, sy, sz = rng.uniform(lo, hi, size=3)
    return [(*box((-sx / 2, -sy / 2, 0.0), (sx / 2, sy / 2, sz)), 1.0)]


def _ball(rng, small):
    r = rng.uniform(0.05, 0.12) if small else rng.uniform(0.1, 0.2)
    return [(*sphere((0, 0, r), r), 1.0)]


def _lamp(rng, small):
    pole = rng.uniform(0.25, 0.4) if small else rng.uniform(1.2, 1.6)
    base = 0.08 if small else 0.15
    shade = 0.12 if small else 0.2
    return [
        (*frustum((0, 0), base, base, 0.0, 0.03), _ACCENT),
        (*frustum((0, 0), 0.015, 0.015, 0.03, pole), _ACCENT),
        (*frustum((0, 0), shade, shade * 0.6, pole - 0.05, pole + shade * 1.2), 1.0),
    ]


def _plant(rng, small):
    scale = 0.5 if small else 1.0
    pot_r, pot_h = scale * rng.uniform(0.1, 0.2), scale * rng.uniform(0.2, 0.35)
    leaves = scale * rng.uniform(0.2, 0.35)
    top = pot_h + scale * 0.15
    return [
        (*frustum((0, 0), pot_r * 0.75, pot_r, 0.0, pot_h), _ACCENT),
        (*frustum((0, 0), 0.02 * scale, 0.02 * scale, pot_h, top), _ACCENT),
        (*sphere((0, 0, top + leaves * 0.9), leaves), 1.0),
    ]


def _monitor(rng, small):
    width, height = rng.uniform(0.45, 0.7), rng.uniform(0.28, 0.42)
    return [
        (*box((-0.12, -0.09, 0.0), (0.12, 0.09, 0.02)), _ACCENT),
        (*box((-0.02, -0.02, 0.02), (0.02, 0.02, 0.12)), _ACCENT),
        (*box((-width / 2, -0.03, 0.12), (width / 2, 0.0, 0.12 + height)), 1.0),
    ]


def _trash_can(rng, small):
    r, h = rng.uniform(0.12, 0.2), rng.uniform(0.3, 0.5)
    return [(*frustum((0, 0), r * 0.85, r, 0.0, h), 1.0)]


CATEGORIES = {
    "table": _table,
    "chair": _chair,
    "bed": _bed,
    "sofa": _sofa,
    "cabinet": _cabinet,
    "shelf": _shelf,
    "box": _box,
    "ball": _ball,
    "lamp": _lamp,
    "plant": _plant,
    "monitor": _monitor,
    "trash can": _trash_can,
}
FLOOR_CATEGORIES = tuple(c for c in CATEGORIES if c != "monitor")


# ---------------------------------------------------------------- assembling a room
@dataclasses.dataclass
class _Placed:
    id: int
    label: str
    color: str
    vertices: np.ndarray  # [P,3] world frame, flat-shaded (3 per face)
    faces: np.ndarray
    colors: np.ndarray
    box: np.ndarray  # [6]
    on: int | None  # id of the object it rests on, None for the floor


def _flat_shaded(parts, rgb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates parts with 3 vertices per face so each face carries its own baked shade."""
    verts, cols = [], []
    for v, f, shade in parts:
        tri = v[f]  # [F,3,3]
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        light = 0.65 + 0.35 * np.clip(n @ _LIGHT, 0.0, 1.0)
        c = np.clip(np.asarray(rgb) * shade * light[:, None], 0, 255)
        verts.append(tri.reshape(-1, 3))
        cols.append(np.repeat(c, 3, axis=0))
    vertices = np.concatenate(verts)
    return vertices, np.arange(len(vertices)).reshape(-1, 3), np.concatenate(cols)


def _yawed(parts, yaw: float):
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return [(v @ rot.T, f, shade) for v, f, shade in parts]


def _footprint_free(lo, hi, boxes, gap) -> bool:
    return all(
        hi[0] + gap <= b[0] or b[3] + gap <= lo[0] or hi[1] + gap <= b[1] or b[4] + gap <= lo[1]
        for b in boxes
    )


def _structure(rng, width, depth, height):
    """Floor of 0.5 m tiles (alternating shade) and four inward-facing walls, all instance -1."""
    floor_color, wall_color = rng.choice(FLOOR_COLORS), rng.choice(WALL_COLORS)
    xs = np.append(np.arange(0.0, width, 0.5), width)
    ys = np.append(np.arange(0.0, depth, 0.5), depth)
    verts, cols = [], []
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[j], ys[j + 1]
            quad = [(x0, y0, 0), (x1, y0, 0), (x1, y1, 0), (x0, y0, 0), (x1, y1, 0), (x0, y1, 0)]
            verts.append(quad)
            cols.append([np.asarray(COLORS[floor_color]) * (1.0 if (i + j) % 2 else 0.88)] * 6)
    walls = [  # (corner a, corner b): the wall runs from a to b; inside is on its left
        ((0, 0), (width, 0)),
        ((width, 0), (width, depth)),
        ((width, depth), (0, depth)),
        ((0, depth), (0, 0)),
    ]
    for k, ((ax, ay), (bx, by)) in enumerate(walls):
        quad = [
            (ax, ay, 0),
            (bx, by, height),
            (bx, by, 0),
            (ax, ay, 0),
            (ax, ay, height),
            (bx, by, height),
        ]
        verts.append(quad)
        cols.append([np.asarray(COLORS[wall_color]) * (0.8 + 0.05 * k)] * 6)
    vertices = np.asarray(verts, float).reshape(-1, 3)
    return vertices, np.asarray(cols, float).reshape(-1, 3), floor_color, wall_color


def make_scene(seed: int, index: int) -> Scene:
    """Room number `index` of the dataset with seed `seed`: a pure function of the pair."""
    rng = np.random.default_rng([seed, index])
    width, depth = rng.uniform(4.0, 8.0), rng.uniform(3.5, 7.0)
    height = rng.uniform(2.5, 3.0)
    wanted = int(rng.integers(3, 16))
    placed: list[_Placed] = []
    floor_area = 0.0
    for _ in range(60 * wanted):
        if len(placed) == wanted:
            break
        supports = [p for p in placed if p.label in SUPPORTS]
        on_support = supports and rng.random() < 0.35
        label = str(rng.choice(SMALL if on_support else FLOOR_CATEGORIES))
        color = str(rng.choice(CATEGORY_COLORS.get(label, tuple(COLORS))))
        yaw = rng.integers(4) * np.pi / 2 + rng.uniform(-0.25, 0.25)
        parts = _yawed(CATEGORIES[label](rng, small=bool(on_support)), yaw)
        verts = np.concatenate([v for v, _, _ in parts])
        lo, hi = verts.min(axis=0), verts.max(axis=0)
        size = hi - lo
        if on_support:
            base = supports[int(rng.integers(len(supports)))]
            room_lo, room_hi, z0 = base.box[:2] + 0.02, base.box[3:5] - 0.02, base.box[5]
            neighbours = [p.box for p in placed if p.on == base.id]
        else:
            if floor_area + size[0] * size[1] > 0.45 * width * depth:
                continue  # leave floor space for the cameras
            room_lo, room_hi, z0 = np.array([0.05, 0.05]), np.array([width, depth]) - 0.05, 0.0
            neighbours = [p.box for p in placed if p.on is None]
        if np.any(room_hi - room_lo < size[:2]):
            continue
        xy = rng.uniform(room_lo, room_hi - size[:2])
        shift = np.array([xy[0] - lo[0], xy[1] - lo[1], z0 - lo[2]])
        new_lo, new_hi = lo + shift, hi + shift
        if not _footprint_free(new_lo, new_hi, neighbours, gap=0.1 if z0 == 0 else 0.02):
            continue
        parts = [(v + shift, f, shade) for v, f, shade in parts]
        v, f, c = _flat_shaded(parts, COLORS[color])
        placed.append(
            _Placed(
                id=len(placed),
                label=label,
                color=color,
                vertices=v,
                faces=f,
                colors=c,
                box=np.concatenate([v.min(axis=0), v.max(axis=0)]),
                on=None if z0 == 0 else base.id,
            )
        )
        if z0 == 0:
            floor_area += size[0] * size[1]
    if len(placed) < 3:
        raise RuntimeError(
            f"synthetic room (seed {seed}, index {index}) has only {len(placed)} objects"
        )

    s_verts, s_cols, floor_color, wall_color = _structure(rng, width, depth, height)
    vertices = [s_verts] + [p.vertices for p in placed]
    colors = [s_cols] + [p.colors for p in placed]
    instance = [np.full(len(s_verts), -1)] + [np.full(len(p.vertices), p.id) for p in placed]
    vertices = np.concatenate(vertices).astype(np.float32)
    instance = np.concatenate(instance).astype(np.int32)
    ids = [p.id for p in placed]
    boxes = boxes_from_instances(vertices, instance, ids)  # from the float32 vertices: exact
    objects = [SceneObject(p.id, p.label, boxes[k], p.color) for k, p in enumerate(placed)]
    return Scene(
        scene_id=f"synth_{index:04d}",
        vertices=vertices,
        faces=np.arange(len(vertices), dtype=np.int32).reshape(-1, 3),
        colors=np.rint(np.concatenate(colors)).astype(np.uint8),
        instance=instance,
        objects=objects,
        meta={
            "source": "synthetic",
            "seed": int(seed),
            "index": int(index),
            "room": [0.0, 0.0, 0.0, float(width), float(depth), float(height)],
            "floor_color": str(floor_color),
            "wall_color": str(wall_color),
            "on_top_of": [[p.id, p.on] for p in placed if p.on is not None],
        },
    )


def make_object_scene(seed: int, index: int) -> Scene:
    """Object number `index` of the object set with seed `seed`: one object of a random
    category and colour, alone, as its own scene (a pure function of the pair)."""
    rng = np.random.default_rng([seed, index, 1])  # another stream than the rooms'
    label = str(rng.choice(tuple(CATEGORIES)))
    color = str(rng.choice(CATEGORY_COLORS.get(label, tuple(COLORS))))
    parts = _yawed(CATEGORIES[label](rng, small=False), rng.uniform(0.0, 2 * np.pi))
    verts = np.concatenate([v for v, _, _ in parts])
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    shift = np.array([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
    vertices, faces, colors = _flat_shaded(
        [(v + shift, f, shade) for v, f, shade in parts], COLORS[color]
    )
    vertices = vertices.astype(np.float32)
    instance = np.zeros(len(vertices), np.int32)
    box = boxes_from_instances(vertices, instance, [0])[0]
    return Scene(
        scene_id=f"synth_obj_{index:04d}",
        vertices=vertices,
        faces=faces.astype(np.int32),
        colors=np.rint(colors).astype(np.uint8),
        instance=instance,
        objects=[SceneObject(0, label, box, color)],
        meta={"source": "synthetic", "level": "object", "seed": int(seed), "index": int(index)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-scenes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for <scene_id>.npz files")
    parser.add_argument(
        "--objects",
        action="store_true",
        help="one object per scene (object level) instead of rooms",
    )
    args = parser.parse_args(argv)
    if args.num_scenes < 1:
        raise InputError(None, f"--num-scenes must be at least 1, got {args.num_scenes}")
    output_folder(args.out)
    make = make_object_scene if args.objects else make_scene
    for index in tqdm(range(args.num_scenes), desc="synthetic scenes", unit="scene", disable=None):
        with writing(args.out):
            make(args.seed, index).save(args.out)
    print(f"wrote {args.num_scenes} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    cli_main(main)
