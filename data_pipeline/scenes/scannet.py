"""ScanNet scans as a `Scene`: mesh, over-segmentation, object aggregation and axis alignment.

A scan folder `<scene_id>/` holds
  <scene_id>_vh_clean_2.ply                 vertices (x y z, red green blue alpha) and triangles
  <scene_id>_vh_clean_2.0.010000.segs.json  {"segIndices": [segment id per vertex]}
  <scene_id>.aggregation.json               {"segGroups": [{"objectId", "label", "segments"}]}
                                            (older exports: <scene_id>_vh_clean.aggregation.json)
  <scene_id>.txt                            "axisAlignment = m00 m01 ... m33" (row-major 4x4)

Vertices are aligned as [x y z 1] M^T; boxes are min/max of each object's aligned vertices
(computed here: some preprocessing scripts store unaligned boxes under an "aligned" name). A
scan without axisAlignment (the test split) is used as is, with a warning. Objects keep their
ScanNet `objectId` (ScanRefer / ScanQA refer to it); walls, floors and ceilings are structure
(instance -1), like the unlabelled vertices. A scan without aggregation (the test split) has no
objects. `meta.scene_type` is the scan's `sceneType` when the .txt gives one.

    python -m data_pipeline.scenes.scannet --scans SCANS_DIR --out SCENES   # every scan folder in SCANS_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np
from tqdm import tqdm

from data_pipeline.scenes.mesh import read_mesh
from data_pipeline.scenes.scene import Scene, SceneObject, boxes_from_instances
from llm3d_jax.fileio import InputError, cli_main, output_folder, writing

STRUCTURE_LABELS = frozenset({"wall", "floor", "ceiling"})


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None


def read_scan_info(path: str) -> dict[str, str]:
    """`key = value` lines of a scan's `<scene_id>.txt` ({} when the file is missing)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as f:
        pairs = (line.partition("=") for line in f)
        return {key.strip(): value.strip() for key, sep, value in pairs if sep}


def read_axis_alignment(path: str) -> np.ndarray:
    """The 4x4 `axisAlignment` of a scan's `<scene_id>.txt`; none there warns and gives identity."""
    value = read_scan_info(path).get("axisAlignment")
    if value is None:
        warnings.warn(f"{path}: no axisAlignment: using identity", stacklevel=2)
        return np.eye(4)
    try:
        numbers = [float(x) for x in value.split()]
    except ValueError:
        numbers = []
    if len(numbers) != 16 or not np.isfinite(numbers).all():
        raise InputError(path, "axisAlignment must be 16 numbers")
    return np.array(numbers).reshape(4, 4)


def _read_objects(segs_path: str, agg_path: str, num_vertices: int):
    """-> instance int32 [V] (objectId per vertex, -1 for structure / unlabelled), [(id, label)]."""
    seg_indices = _read_json(segs_path).get("segIndices")
    if not isinstance(seg_indices, list):
        raise InputError(segs_path, 'no "segIndices" list')
    seg_indices = np.asarray(seg_indices)
    if seg_indices.shape != (num_vertices,) or not np.issubdtype(seg_indices.dtype, np.integer):
        raise InputError(
            segs_path,
            f"segIndices has {seg_indices.size} entries, the mesh has {num_vertices} vertices",
        )
    groups = _read_json(agg_path).get("segGroups")
    if not isinstance(groups, list):
        raise InputError(agg_path, 'no "segGroups" list')
    known_segments = set(np.unique(seg_indices).tolist())
    instance = np.full(num_vertices, -1, np.int32)
    objects: list[tuple[int, str]] = []
    for group in groups:
        try:
            object_id, label = int(group["objectId"]), str(group["label"])
            segments = list(group["segments"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                agg_path, f"segGroup without objectId / label / segments: {str(group)[:80]}"
            ) from None
        missing = [seg for seg in segments if seg not in known_segments]
        if missing:
            raise InputError(
                agg_path,
                f"object {object_id} ({label}) uses segments {missing[:5]} that are not in "
                f"{os.path.basename(segs_path)}",
            )
        if label.lower() in STRUCTURE_LABELS:
            continue
        instance[np.isin(seg_indices, segments)] = object_id
        objects.append((object_id, label))
    # An object whose segments were all taken by later groups has no vertices left: drop it.
    return instance, [o for o in objects if (instance == o[0]).any()]


def load_scannet_scene(scan_dir: str, scene_id: str | None = None) -> Scene:
    """Reads one ScanNet scan folder into an axis-aligned Scene (`meta.source` "scannet").

    A scan without an aggregation file (the test split) has no objects: a warning, and every
    vertex is instance -1.
    """
    scene_id = scene_id or os.path.basename(os.path.normpath(scan_dir))
    base = os.path.join(scan_dir, scene_id)
    ply_path = f"{base}_vh_clean_2.ply"
    segs_path = f"{base}_vh_clean_2.0.010000.segs.json"
    agg_path = f"{base}.aggregation.json"
    if not os.path.exists(agg_path) and os.path.exists(f"{base}_vh_clean.aggregation.json"):
        agg_path = f"{base}_vh_clean.aggregation.json"

    vertices, faces, colors = read_mesh(ply_path)
    if os.path.exists(agg_path):
        instance, objects = _read_objects(segs_path, agg_path, len(vertices))
    else:
        warnings.warn(f"{agg_path}: file not found: the scene has no objects", stacklevel=2)
        instance, objects = np.full(len(vertices), -1, np.int32), []

    info_path = f"{base}.txt"
    align = read_axis_alignment(info_path)
    aligned = (np.c_[vertices.astype(np.float64), np.ones(len(vertices))] @ align.T)[:, :3]
    aligned = aligned.astype(np.float32)
    boxes = boxes_from_instances(aligned, instance, [o[0] for o in objects])
    meta = {
        "source": "scannet",
        "axis_aligned": not np.array_equal(align, np.eye(4)),
        "room": [*map(float, aligned.min(0)), *map(float, aligned.max(0))],
    }
    scene_type = read_scan_info(info_path).get("sceneType")
    if scene_type:
        meta["scene_type"] = scene_type
    return Scene(
        scene_id=scene_id,
        vertices=aligned,
        faces=faces,
        colors=colors,
        instance=instance,
        objects=[SceneObject(i, label, boxes[k]) for k, (i, label) in enumerate(objects)],
        meta=meta,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scans", required=True, help="a folder of scan folders, or one scan folder"
    )
    parser.add_argument("--out", required=True, help="folder for <scene_id>.npz scene files")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.scans):
        raise InputError(args.scans, "not a folder")
    name = os.path.basename(os.path.normpath(args.scans))
    if os.path.exists(os.path.join(args.scans, f"{name}_vh_clean_2.ply")):
        scans = [args.scans]
    else:
        scans = sorted(
            os.path.join(args.scans, d)
            for d in os.listdir(args.scans)
            if os.path.isdir(os.path.join(args.scans, d))
        )
    if not scans:
        raise InputError(args.scans, "no scan folders")
    output_folder(args.out)
    failed = 0
    for scan in tqdm(scans, desc="scannet", unit="scan", disable=None):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scene = load_scannet_scene(scan)
                with writing(args.out):
                    scene.save(args.out)
            for w in caught:
                tqdm.write(f"warning: {w.message}", file=sys.stderr)
        except InputError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failed += 1
    print(f"wrote {len(scans) - failed} of {len(scans)} scenes to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
