"""Generic mesh files (.ply, .obj, .glb/.gltf) as a `Scene`, with an optional objects JSON.

PLY is parsed here (ASCII and binary, as ScanNet writes it), so a truncated or corrupt file is a
precise error rather than a silently partial mesh; .obj and glTF go through open3d (assimp).
glTF is y-up by specification and is turned z-up: (x, y, z) -> (x, -z, y). Colours come from the
vertex colours, else from the textures (sampled at the triangle corners), else uniform gray.

Objects JSON (coordinates in the z-up scene frame):

    {"objects": [{"id": 0, "label": "chair", "vertex_indices": [0, 1, ...], "color": "red"},
                 {"id": 1, "label": "lamp", "box": [xmin, ymin, zmin, xmax, ymax, zmax]}]}

An object takes the listed vertices, or every vertex inside its box; a vertex claimed by two
objects is an error. Boxes of the scene are recomputed from the vertices. Without a JSON the whole
mesh is one object labelled with the file name.

    python -m data_pipeline.scenes.mesh MESH [MESH ...] --out SCENES [--objects JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import open3d as o3d
from tqdm import tqdm

from data_pipeline.scenes.scene import Scene, SceneObject, boxes_from_instances
from llm3d_jax.fileio import InputError, cli_main, output_folder, writing

DEFAULT_GRAY = (180, 180, 180)
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


# ---------------------------------------------------------------- PLY
def _ply_header(path: str, data: bytes):
    """-> (format, [(element, count, [(name, dtype) | (name, count_dtype, item_dtype)])], data offset)."""
    if not data.startswith(b"ply"):
        raise InputError(path, "not a PLY file (no 'ply' magic)")
    end = data.find(b"end_header")
    if end < 0:
        raise InputError(path, "PLY header has no end_header")
    offset = data.index(b"\n", end) + 1
    fmt, elements = None, []
    for line in data[:end].decode("ascii", errors="replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property" and words[1] == "list":
                elements[-1][2].append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
            elif words[0] == "property":
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError
        except (IndexError, KeyError, ValueError):
            raise InputError(path, f"bad PLY header line {line!r}") from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(path, f"unknown PLY format {fmt!r}")
    return fmt, elements, offset


def _fan(polygons: list[np.ndarray]) -> np.ndarray:
    """Triangulates polygons as fans: [a, b, c, d] -> (a, b, c), (a, c, d)."""
    tris = [(p[0], p[k], p[k + 1]) for p in polygons for k in range(1, len(p) - 1)]
    return np.asarray(tris, np.int64).reshape(-1, 3)


def read_ply(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> vertices float32 [V,3], faces int32 [F,3], colors uint8 [V,3] or None."""
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    with open(path, "rb") as f:
        data = f.read()
    fmt, elements, offset = _ply_header(path, data)
    tables: dict[str, dict[str, np.ndarray]] = {}
    faces_list: list[np.ndarray] = []
    if fmt == "ascii":
        lines = data[offset:].decode("ascii", errors="replace").splitlines()
        row = 0
        for name, count, props in elements:
            if row + count > len(lines):
                raise InputError(
                    path,
                    f"truncated: {name} element declares {count} rows, file ends after {len(lines) - row}",
                )
            rows = lines[row : row + count]
            row += count
            try:
                if all(len(p) == 2 for p in props):
                    values = np.array([r.split() for r in rows], np.float64).reshape(
                        count, len(props)
                    )
                    tables[name] = {p[0]: values[:, k] for k, p in enumerate(props)}
                elif name == "face" and len(props) == 1:
                    for r in rows:
                        nums = [int(x) for x in r.split()]
                        if len(nums) != nums[0] + 1:
                            raise ValueError
                        faces_list.append(np.array(nums[1:]))
                else:
                    raise InputError(path, f"unsupported PLY element layout {name!r}")
            except ValueError:
                raise InputError(path, f"bad number in {name} rows") from None
    else:
        endian = "<" if fmt == "binary_little_endian" else ">"
        pos = offset
        for name, count, props in elements:
            if all(len(p) == 2 for p in props):
                dtype = np.dtype([(p[0], endian + p[1]) for p in props])
                size = dtype.itemsize * count
                if pos + size > len(data):
                    raise InputError(
                        path,
                        f"truncated: {count} {name} rows need {size} bytes, {len(data) - pos} left",
                    )
                table = np.frombuffer(data, dtype, count, pos)
                tables[name] = {p[0]: table[p[0]] for p in props}
                pos += size
            elif name == "face" and len(props) == 1:
                _, count_t, item_t = props[0]
                # Fast path: every face a triangle (ScanNet); checked, else parse row by row.
                dtype = np.dtype([("n", endian + count_t), ("v", endian + item_t, 3)])
                size = dtype.itemsize * count
                table = np.frombuffer(data, dtype, count, pos) if pos + size <= len(data) else None
                if table is not None and (table["n"] == 3).all():
                    faces_list = [table["v"].astype(np.int64)]
                    pos += size
                    continue
                item = np.dtype(endian + item_t)
                head = np.dtype(endian + count_t)
                for _ in range(count):
                    if pos + head.itemsize > len(data):
                        raise InputError(
                            path, f"truncated: {count} faces declared, file ends early"
                        )
                    n = int(np.frombuffer(data, head, 1, pos)[0])
                    pos += head.itemsize
                    if pos + n * item.itemsize > len(data):
                        raise InputError(
                            path, f"truncated: {count} faces declared, file ends early"
                        )
                    faces_list.append(np.frombuffer(data, item, n, pos).astype(np.int64))
                    pos += n * item.itemsize
            else:
                raise InputError(path, f"unsupported PLY element layout {name!r}")
    vertex = tables.get("vertex")
    if vertex is None or not all(k in vertex for k in "xyz"):
        raise InputError(path, "PLY has no vertex element with x, y, z")
    vertices = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float32)
    if len(faces_list) == 1 and faces_list[0].ndim == 2:
        faces = faces_list[0]
    else:
        faces = _fan(faces_list)
    colors = None
    for r, g, b in (("red", "green", "blue"), ("diffuse_red", "diffuse_green", "diffuse_blue")):
        if r in vertex and g in vertex and b in vertex:
            rgb = np.stack([vertex[r], vertex[g], vertex[b]], axis=1).astype(np.float64)
            if np.issubdtype(vertex[r].dtype, np.floating) and rgb.max(initial=0) <= 1.0:
                rgb = rgb * 255
            colors = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
            break
    return vertices, faces.astype(np.int32).reshape(-1, 3), colors


# ---------------------------------------------------------------- any mesh file
def _texture_colors(mesh: o3d.geometry.TriangleMesh) -> np.ndarray | None:
    """Vertex colours sampled from the mesh's textures (nearest texel at each triangle corner's
    uv, averaged over the corners sharing a vertex); None when the mesh has no texture."""
    faces = np.asarray(mesh.triangles)
    uvs = np.asarray(mesh.triangle_uvs)
    textures = [np.asarray(t) for t in mesh.textures]
    if len(faces) == 0 or len(uvs) != 3 * len(faces) or not any(t.size for t in textures):
        return None
    materials = np.asarray(mesh.triangle_material_ids)
    if len(materials) != len(faces):
        materials = np.zeros(len(faces), int)
    corner_rgb = np.full((len(faces), 3, 3), DEFAULT_GRAY, np.float64)
    uvs = uvs.reshape(-1, 3, 2)
    for m in np.unique(materials):
        texture = textures[m] if 0 <= m < len(textures) else np.zeros(0)
        if texture.size == 0:
            continue
        texture = (
            texture[..., :3] if texture.ndim == 3 else np.repeat(texture[..., None], 3, axis=-1)
        )
        if texture.dtype != np.uint8:  # float textures hold 0..1
            texture = np.clip(np.rint(texture * 255), 0, 255)
        h, w = texture.shape[:2]
        uv = uvs[materials == m] % 1.0
        # Texture v runs upwards, image rows downwards.
        cols = np.minimum((uv[..., 0] * w).astype(int), w - 1)
        rows = np.minimum(((1.0 - uv[..., 1]) * h).astype(int), h - 1)
        corner_rgb[materials == m] = texture[rows, cols]
    total = np.zeros((len(mesh.vertices), 3))
    count = np.zeros(len(mesh.vertices))
    np.add.at(total, faces.ravel(), corner_rgb.reshape(-1, 3))
    np.add.at(count, faces.ravel(), 1)
    total[count == 0] = DEFAULT_GRAY
    return np.clip(np.rint(total / np.maximum(count, 1)[:, None]), 0, 255).astype(np.uint8)


def read_mesh(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> vertices float32 [V,3] (z up), faces int32 [F,3], colors uint8 [V,3]. Empty is an error."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if ext == ".ply":
        vertices, faces, colors = read_ply(path)
    elif ext in (".obj", ".glb", ".gltf"):
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            mesh = o3d.io.read_triangle_mesh(path)
        vertices = np.asarray(mesh.vertices, np.float32)
        faces = np.asarray(mesh.triangles, np.int32)
        if mesh.has_vertex_colors():
            colors = np.clip(np.rint(np.asarray(mesh.vertex_colors) * 255), 0, 255).astype(np.uint8)
        else:
            colors = _texture_colors(mesh)
        if ext in (".glb", ".gltf"):
            vertices = (
                np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
                if len(vertices)
                else vertices
            )
    else:
        raise InputError(path, f"unsupported mesh type {ext!r} (use .ply, .obj, .glb or .gltf)")
    if len(vertices) == 0 or len(faces) == 0:
        raise InputError(
            path, f"empty or unreadable mesh ({len(vertices)} vertices, {len(faces)} triangles)"
        )
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise InputError(path, f"face indices outside 0..{len(vertices) - 1}")
    if not np.isfinite(vertices).all():
        raise InputError(path, "vertices contain NaN or inf")
    if colors is None:
        colors = np.tile(np.array(DEFAULT_GRAY, np.uint8), (len(vertices), 1))
    return np.ascontiguousarray(vertices, np.float32), faces, colors


def _read_objects(path: str, vertices: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Objects JSON -> instance int32 [V] and [(id, label, color)]."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["objects"]
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(
            path, f'expected JSON {{"objects": [...]}} ({type(err).__name__}: {err})'
        ) from None
    instance = np.full(len(vertices), -1, np.int32)
    objects = []
    for k, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("id"), int)
            or not isinstance(row.get("label"), str)
        ):
            raise InputError(path, f'object {k}: needs an integer "id" and a string "label"')
        if ("vertex_indices" in row) == ("box" in row):
            raise InputError(path, f'object {k}: give exactly one of "vertex_indices" or "box"')
        if "box" in row:
            box = np.asarray(row["box"], np.float64)
            if box.shape != (6,):
                raise InputError(path, f"object {k}: box must be 6 numbers")
            mine = np.all((vertices >= box[:3]) & (vertices <= box[3:]), axis=1)
        else:
            idx = np.asarray(row["vertex_indices"])
            if (
                idx.ndim != 1
                or not np.issubdtype(idx.dtype, np.integer)
                or (idx < 0).any()
                or (idx >= len(vertices)).any()
            ):
                raise InputError(
                    path, f"object {k}: vertex_indices must be integers in 0..{len(vertices) - 1}"
                )
            mine = np.zeros(len(vertices), bool)
            mine[idx] = True
        if not mine.any():
            raise InputError(path, f"object {k} ({row['label']}): selects no vertices")
        if (instance[mine] >= 0).any():
            raise InputError(
                path, f"object {k} ({row['label']}): shares vertices with another object"
            )
        if any(o[0] == row["id"] for o in objects):
            raise InputError(path, f"object {k}: duplicate id {row['id']}")
        instance[mine] = row["id"]
        objects.append((row["id"], row["label"], str(row.get("color", ""))))
    return instance, objects


def scene_id_from_path(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def load_mesh_scene(
    path: str, objects_json: str | None = None, scene_id: str | None = None
) -> Scene:
    """A mesh file (+ optional objects JSON) as a Scene; `meta.source` is "mesh"."""
    vertices, faces, colors = read_mesh(path)
    if objects_json is None:
        label = os.path.splitext(os.path.basename(path))[0].replace("_", " ")
        instance = np.zeros(len(vertices), np.int32)
        listed = [(0, label, "")]
    else:
        instance, listed = _read_objects(objects_json, vertices)
    boxes = boxes_from_instances(vertices, instance, [o[0] for o in listed])
    return Scene(
        scene_id=scene_id or scene_id_from_path(path),
        vertices=vertices,
        faces=faces,
        colors=colors,
        instance=instance,
        objects=[
            SceneObject(i, label, boxes[k], color) for k, (i, label, color) in enumerate(listed)
        ],
        meta={"source": "mesh", "file": os.path.basename(path)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("meshes", nargs="+", help=".ply / .obj / .glb / .gltf files")
    parser.add_argument("--objects", help="objects JSON (only with a single mesh)")
    parser.add_argument("--out", required=True, help="folder for <scene_id>.npz scene files")
    args = parser.parse_args(argv)
    if args.objects and len(args.meshes) != 1:
        raise InputError(args.objects, "--objects needs exactly one mesh file")
    output_folder(args.out)
    failed = 0
    for path in tqdm(args.meshes, desc="meshes", unit="mesh", disable=None):
        try:
            scene = load_mesh_scene(path, args.objects)
            with writing(args.out):
                scene.save(args.out)
        except InputError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failed += 1
    print(f"wrote {len(args.meshes) - failed} of {len(args.meshes)} scenes to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
