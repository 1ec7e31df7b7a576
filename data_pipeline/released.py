"""Import the released 3D-LLM scene features into our scene feature files.

    python -m data_pipeline.released --features PT_DIR --voxels NPY_DIR --out FEATURES [--scenes SCENES]

The release ships, per scene, `<scene_id>.pt` (a torch tensor [N,1408] of point features, e.g.
`voxelized_features_sam_nonzero_preprocess/`) and `<scene_id>.npy` (int [N,3] voxel coordinates
on the 256^3 grid, e.g. `voxelized_voxels_sam_nonzero_preprocess/`). The `.pt` files are read with
`llm3d_jax.convert.pth.read_pth` (no torch, no pickle code runs); `.npy` without pickle.

The release stores no metric frame. With `--scenes` (our scene files, e.g. ScanNet after
axisAlignment) the grid is the scene's (origin = AABB min, voxel = largest extent / 256), the
objects are copied and each point takes the instance id of its nearest mesh vertex; without it
the grid is the unit cube (origin 0, voxel 1/256) and meta says `"metric": false`. Points are voxel
centres. Rows with zero features are dropped; features are L2-normalised to float16.

    python -m data_pipeline.released --objects --features features/ --voxels points/ --out FEATURES

--objects: the release's Objaverse features (inference.py's object mode), `<uid>_outside.pt` and
`<uid>_outside.npy` (views from outside the object). Each becomes `FEATURES/<uid>.npz` holding one
object: id 0, label "object", its box the points' bounds, every point's instance 0, meta
"level": "object" (the object_caption records of `python -m data_pipeline.language --import
objaverse` name the same `<uid>`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
from scipy.spatial import cKDTree
from tqdm import tqdm

from data_pipeline.lift.voxelize import GRID, grid_for_bounds
from data_pipeline.scenes import Scene, SceneObject
from llm3d_jax.convert.pth import read_pth
from llm3d_jax.fileio import (
    InputError,
    child_path,
    cli_main,
    output_folder,
    save_npz_atomic,
    writing,
)

FORMAT_VERSION = 1
OBJECT_SUFFIX = "_outside"  # the release's Objaverse feature files: <uid>_outside.pt / .npy


def read_released_features(path: str) -> np.ndarray:
    """float32 [N,D] from a `.pt` holding one tensor (or a dict with exactly one tensor)."""
    tensors = read_pth(path)
    if len(tensors) != 1:
        raise InputError(
            path, f"expected one feature tensor, found {len(tensors)}: {sorted(tensors)[:4]}"
        )
    features = next(iter(tensors.values()))
    if features.ndim != 2 or features.dtype.kind != "f":
        raise InputError(
            path, f"features must be a float [N,D] tensor, got {features.dtype} {features.shape}"
        )
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(path, f"the feature tensor holds no rows (shape {features.shape})")
    if not np.isfinite(features).all():
        raise InputError(path, "features contain NaN or inf")
    return features.astype(np.float32)


def read_released_voxels(path: str, n: int) -> np.ndarray:
    """int64 [N,3] voxel coordinates in 0..255 from a `.npy` (no pickle)."""
    if not os.path.exists(path):
        raise InputError(path, "voxel file not found")
    try:
        voxels = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise InputError(path, f"not a plain .npy array ({err})") from None
    if voxels.shape != (n, 3):
        raise InputError(
            path, f"voxels have shape {voxels.shape}, expected ({n}, 3) to match the features"
        )
    if voxels.dtype.kind == "f":
        if not np.isfinite(voxels).all() or (voxels != np.round(voxels)).any():
            raise InputError(path, "voxel coordinates must be integers")
    elif voxels.dtype.kind not in "iu":
        raise InputError(path, f"voxel coordinates must be integers, got {voxels.dtype}")
    voxels = voxels.astype(np.int64)
    if voxels.min() < 0 or voxels.max() > GRID - 1:
        raise InputError(path, f"voxel coordinates outside 0..{GRID - 1}")
    return voxels


def object_id_of(stem: str) -> str:
    """The Objaverse uid of a released object feature file's stem (`<uid>_outside`)."""
    return stem[: -len(OBJECT_SUFFIX)] if stem.endswith(OBJECT_SUFFIX) else stem


def import_scene(
    features_path: str, voxels_path: str, scene: Scene | None = None, one_object: bool = False
) -> dict[str, np.ndarray]:
    """The arrays of one scene feature file, meta included; `one_object`: an object-level file
    (module doc, --objects)."""
    scene_id = os.path.splitext(os.path.basename(features_path))[0]
    if one_object:
        scene_id = object_id_of(scene_id)
    features = read_released_features(features_path)
    voxels = read_released_voxels(voxels_path, len(features))
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    keep = norm[:, 0] > 0
    features, voxels = features[keep] / norm[keep], voxels[keep]
    if len(features) == 0:
        raise InputError(features_path, "every feature row is zero")
    if scene is not None:
        origin, voxel = grid_for_bounds(scene.vertices.min(axis=0), scene.vertices.max(axis=0))
    else:
        origin, voxel = np.zeros(3, np.float32), np.float32(1.0 / GRID)
    points = (origin + (voxels.astype(np.float32) + np.float32(0.5)) * voxel).astype(np.float32)
    # Voxel centres sit half a cell from every face, so floor((p - origin) / voxel) == voxels.
    if scene is not None:
        _, nearest = cKDTree(scene.vertices).query(points)
        instance = scene.instance[nearest].astype(np.int32)
        objects = scene.objects
    elif one_object:
        instance = np.zeros(len(points), np.int32)
        box = np.concatenate([points.min(axis=0), points.max(axis=0)])
        objects = [SceneObject(0, "object", box.astype(np.float32))]
    else:
        instance = np.full(len(points), -1, np.int32)
        objects = []
    meta = {
        "scene_id": scene.scene_id if scene is not None else scene_id,
        "source": "3dllm_release",
        "method": "released",
        "encoder": "released",
        "dim": int(features.shape[1]),
        "metric": scene is not None,
        "format_version": FORMAT_VERSION,
    }
    if one_object:
        meta["level"] = "object"
    return {
        "points": points,
        "features": features.astype(np.float16),
        "voxels": voxels.astype(np.uint8),
        "grid_origin": np.asarray(origin, np.float32),
        "grid_voxel": np.asarray(voxel, np.float32),
        "colors": np.zeros((len(points), 3), np.uint8),
        "instance": instance,
        "object_ids": np.array([o.id for o in objects], np.int32),
        "object_labels": np.array([o.label for o in objects], dtype=np.str_),
        "object_boxes": np.array([o.box for o in objects], np.float32).reshape(-1, 6),
        "meta": np.array(json.dumps(meta)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", required=True, help="folder of released <scene_id>.pt")
    parser.add_argument("--voxels", required=True, help="folder of released <scene_id>.npy")
    parser.add_argument("--out", required=True, help="folder for <scene_id>.npz feature files")
    parser.add_argument(
        "--scenes", help="folder of our <scene_id>.npz scenes (metric grid, objects)"
    )
    parser.add_argument(
        "--objects",
        action="store_true",
        help="Objaverse objects: <uid>_outside.pt -> <uid>.npz holding one object",
    )
    args = parser.parse_args(argv)
    if args.objects and args.scenes:
        raise InputError(None, "--objects imports lone objects; it takes no --scenes")
    paths = sorted(glob.glob(os.path.join(args.features, "*.pt")))
    if not paths:
        raise InputError(args.features, "no .pt feature files")
    output_folder(args.out)
    failed = []
    for path in tqdm(paths, desc="import released", unit="scene"):
        stem = os.path.splitext(os.path.basename(path))[0]
        scene_id = object_id_of(stem) if args.objects else stem
        try:
            scene = None
            if args.scenes:
                scene = Scene.load(child_path(args.scenes, scene_id, ".npz", path))
            voxels = child_path(args.voxels, stem, ".npy", path)
            arrays = import_scene(path, voxels, scene, args.objects)
            out_path = child_path(args.out, scene_id, ".npz", path)
            with writing(out_path):
                save_npz_atomic(out_path, **arrays)
        except InputError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failed.append(scene_id)
    print(f"{len(paths) - len(failed)} imported, {len(failed)} failed -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
