"""The one scene type every source produces: a coloured triangle mesh with per-vertex instance ids.

The file `SCENES/<scene_id>.npz` (docs/architecture.md, "Scene file") is written
deterministically: the zip entries carry a fixed timestamp, so the same scene always gives the
same bytes (`np.savez` stamps the current time into every entry).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile

import numpy as np

from llm3d_jax.fileio import InputError, child_path, load_npz, name_problem, write_bytes_atomic

FORMAT_VERSION = 1
SCENE_KEYS = (
    "vertices",
    "faces",
    "colors",
    "instance",
    "object_ids",
    "object_labels",
    "object_boxes",
    "object_colors",
    "meta",
)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One labelled object: `box` is its AABB `xmin ymin zmin xmax ymax zmax` in metres."""

    id: int
    label: str
    box: np.ndarray
    color: str = ""


@dataclasses.dataclass
class Scene:
    """A scene mesh in metres, z up.

    vertices float32 [V,3], faces int32 [F,3], colors uint8 [V,3], instance int32 [V]
    (object id per vertex, -1 for structure and unlabelled), objects: one entry per object id.
    `meta` holds the source (`synthetic`, `scannet`, `mesh`) and, when known, the room extent
    `room: [xmin, ymin, zmin, xmax, ymax, zmax]`.
    """

    scene_id: str
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    instance: np.ndarray
    objects: list[SceneObject]
    meta: dict = dataclasses.field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `<directory>/<scene_id>.npz` atomically and byte-deterministically."""
        arrays = {
            "vertices": np.asarray(self.vertices, np.float32),
            "faces": np.asarray(self.faces, np.int32),
            "colors": np.asarray(self.colors, np.uint8),
            "instance": np.asarray(self.instance, np.int32),
            "object_ids": np.array([o.id for o in self.objects], np.int32),
            "object_labels": np.array([o.label for o in self.objects], dtype=np.str_),
            "object_boxes": np.array([o.box for o in self.objects], np.float32).reshape(-1, 6),
            "object_colors": np.array([o.color for o in self.objects], dtype=np.str_),
            "meta": np.array(
                json.dumps(
                    {**self.meta, "scene_id": self.scene_id, "format_version": FORMAT_VERSION},
                    sort_keys=True,
                )
            ),
        }
        path = child_path(directory, self.scene_id, ".npz")
        write_bytes_atomic(path, npz_bytes(arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scene:
        """Reads a scene file without pickle; any missing key or bad shape is an InputError."""
        data = load_npz(path, required=SCENE_KEYS)
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as err:
            raise InputError(path, f"meta is not JSON ({err})") from None
        boxes = data["object_boxes"].reshape(-1, 6)
        objects = [
            SceneObject(int(i), str(label), boxes[k].astype(np.float32), str(color))
            for k, (i, label, color) in enumerate(
                zip(data["object_ids"], data["object_labels"], data["object_colors"])
            )
        ]
        scene_id = meta.pop("scene_id", os.path.splitext(os.path.basename(path))[0])
        if name_problem(scene_id):  # it names the files written for this scene
            raise InputError(path, f"meta.scene_id {scene_id!r:.80} {name_problem(scene_id)}")
        meta.pop("format_version", None)
        scene = cls(
            scene_id=scene_id,
            vertices=data["vertices"],
            faces=data["faces"],
            colors=data["colors"],
            instance=data["instance"],
            objects=objects,
            meta=meta,
        )
        scene.validate(path)
        return scene

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Raises InputError (naming `path`, else the scene id) unless the arrays are consistent."""
        where = path if path is not None else self.scene_id
        v, f = self.vertices, self.faces
        if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
            raise InputError(where, f"mesh has no vertices (vertices shape {v.shape})")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
            raise InputError(where, f"mesh has no triangles (faces shape {f.shape})")
        if f.min() < 0 or f.max() >= len(v):
            raise InputError(where, f"face indices outside 0..{len(v) - 1}")
        if not np.isfinite(v).all():
            raise InputError(where, "vertices contain NaN or inf")
        if self.colors.shape != v.shape or self.instance.shape != (len(v),):
            raise InputError(
                where,
                f"colors {self.colors.shape} / instance {self.instance.shape} do not match "
                f"{len(v)} vertices",
            )
        ids = [o.id for o in self.objects]
        if len(set(ids)) != len(ids):
            raise InputError(where, "duplicate object ids")


def boxes_from_instances(vertices: np.ndarray, instance: np.ndarray, ids) -> np.ndarray:
    """float32 [M,6]: the AABB of the vertices of each object id, in the order of `ids`."""
    boxes = np.zeros((len(ids), 6), np.float32)
    for k, i in enumerate(ids):
        pts = vertices[instance == i]
        boxes[k, :3] = pts.min(axis=0)
        boxes[k, 3:] = pts.max(axis=0)
    return boxes


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (as np.load reads it) whose bytes depend only on the arrays: fixed zip timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, entry.getvalue())
    return buffer.getvalue()
