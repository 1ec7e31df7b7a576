"""Small scene feature files + language records (docs/architecture.md contracts) for the TFDS
and grain tests.

The helpers are imported by tests/data_pipeline/test_tfds_build.py and tests/data/test_*.py; the
tests here check that the fixtures themselves follow the contracts.
"""

from __future__ import annotations

import json
import os

import numpy as np

from llm3d_jax.fileio import load_npz, save_npz_atomic, write_jsonl_atomic

LABELS = ("chair", "table", "lamp", "sofa", "bed")


def make_scene(scene_id: str, num_points: int, dim: int, seed: int) -> dict:
    """Arrays of one scene feature file, random but well formed."""
    rng = np.random.default_rng(seed)
    extent = rng.uniform([3, 3, 2], [6, 5, 3])
    points = rng.uniform(0, extent, (num_points, 3)).astype(np.float32)
    origin = points.min(0)
    voxel = np.float32(float((points.max(0) - origin).max()) / 256 * 1.0001)
    voxels = np.clip(np.floor((points - origin) / voxel), 0, 255).astype(np.uint8)
    features = rng.normal(size=(num_points, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    m = int(rng.integers(1, 4))
    lo = rng.uniform(0, extent * 0.6, (m, 3))
    boxes = np.concatenate([lo, lo + rng.uniform(0.2, 1.0, (m, 3))], 1).astype(np.float32)
    return {
        "points": points,
        "features": features.astype(np.float16),
        "voxels": voxels,
        "grid_origin": origin.astype(np.float32),
        "grid_voxel": voxel,
        "colors": rng.integers(0, 256, (num_points, 3)).astype(np.uint8),
        "instance": rng.integers(-1, m, num_points).astype(np.int32),
        "object_ids": np.arange(m, dtype=np.int32),
        "object_labels": np.asarray([LABELS[i % len(LABELS)] for i in range(m)]),
        "object_boxes": boxes,
        "meta": np.asarray(json.dumps({"scene_id": scene_id, "source": "test", "dim": dim})),
    }


def box_text(box) -> str:
    return "<box>" + " ".join(f"{v:.3f}" for v in box) + "</box>"


def make_records(scene_id: str, scene: dict, n: int, start: int) -> list[dict]:
    """`n` records of mixed tasks on one scene; grounding answers hold `<box>` placeholders."""
    out = []
    for k in range(n):
        i = start + k
        obj = k % len(scene["object_ids"])
        label = str(scene["object_labels"][obj])
        if k % 3 == 0:
            task, prompt, answers = (
                "grounding",
                f"the {label} number {i}",
                [box_text(scene["object_boxes"][obj])],
            )
        elif k % 3 == 1:
            task, prompt, answers = "qa", f"what is object {i}?", [f"a {label}", f"the {label} {i}"]
        else:
            task, prompt, answers = (
                "caption",
                f"describe the room {i}.",
                [f"a room with a {label} and more words {i}"],
            )
        out.append(
            {
                "id": f"{scene_id}-{i}",
                "scene_id": scene_id,
                "task": task,
                "prompt": prompt,
                "answers": answers,
                "object_ids": [int(scene["object_ids"][obj])],
                "source": "template",
                "meta": {"k": i},
            }
        )
    return out


def write_fixture(
    root: str,
    num_scenes: int = 6,
    records_per_scene: int = 4,
    num_points: int = 40,
    dim: int = 16,
    seed: int = 0,
) -> tuple[str, str, dict, list[dict]]:
    """Writes root/features/<id>.npz and root/records.jsonl; returns (features, records, scenes, rows)."""
    features_dir = os.path.join(root, "features")
    scenes, rows = {}, []
    for s in range(num_scenes):
        scene_id = f"scene{s:04d}_00"
        scene = make_scene(scene_id, num_points + 7 * s, dim, seed * 1000 + s)
        save_npz_atomic(os.path.join(features_dir, scene_id + ".npz"), **scene)
        scenes[scene_id] = scene
        rows += make_records(scene_id, scene, records_per_scene, s * records_per_scene)
    records = os.path.join(root, "records.jsonl")
    write_jsonl_atomic(records, rows)
    return features_dir, records, scenes, rows


def test_fixture_follows_feature_file_contract(tmp_path):
    features_dir, records, scenes, rows = write_fixture(str(tmp_path), num_scenes=2)
    for scene_id in scenes:
        data = load_npz(os.path.join(features_dir, scene_id + ".npz"))
        assert data["features"].dtype == np.float16 and data["voxels"].dtype == np.uint8
        want = np.floor((data["points"] - data["grid_origin"]) / data["grid_voxel"])
        np.testing.assert_array_equal(data["voxels"], want)  # no clipping needed: grid covers scene
    with open(records) as f:
        lines = [json.loads(line) for line in f]
    assert lines == rows and all(r["answers"] for r in lines)
