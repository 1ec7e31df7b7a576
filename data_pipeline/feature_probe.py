"""Linear probe of lifted point features: how much of each object's category and colour a
linear read-out recovers on held-out scenes (tools/probe_features.py is its command line, and
its docstring says what the probe is)."""

from __future__ import annotations

import glob
import os
import sys

import numpy as np

from data_pipeline.language.records import read_records, record_split
from llm3d_jax.fileio import InputError, load_npz

RIDGE = 1.0  # the features are standardised, so one strength suits any width


def val_scenes(records: str) -> set[str]:
    rows, problems = read_records(records)
    if problems:
        print(f"{records}: {len(problems)} bad lines skipped ({problems[0]})", file=sys.stderr)
    return {r["scene_id"] for r in rows if record_split(r) == "val"}


def object_table(features_dir: str, scenes_dir: str | None) -> dict[str, list]:
    """-> {"scene": [...], "feature": [...], "category": [...], "colour": [...]}, one row per
    object that has points; colour None where the scene file has no colours."""
    paths = sorted(glob.glob(os.path.join(features_dir, "*.npz")))
    if not paths:
        raise InputError(features_dir, "no <scene_id>.npz feature files")
    table = {"scene": [], "feature": [], "category": [], "colour": []}
    for path in paths:
        scene_id = os.path.basename(path)[: -len(".npz")]
        arrays = load_npz(path, required=("features", "instance", "object_ids", "object_labels"))
        labels = dict(zip(arrays["object_ids"].tolist(), arrays["object_labels"].tolist()))
        colours = {}
        scene_path = os.path.join(scenes_dir, f"{scene_id}.npz") if scenes_dir else ""
        if scene_path and os.path.exists(scene_path):
            scene = load_npz(scene_path, required=("object_ids",))
            if "object_colors" in scene:
                colours = dict(zip(scene["object_ids"].tolist(), scene["object_colors"].tolist()))
        features, instance = arrays["features"].astype(np.float64), arrays["instance"]
        for object_id in np.unique(instance[instance >= 0]).tolist():
            if object_id not in labels:
                raise InputError(path, f"instance id {object_id} is not in object_ids")
            table["scene"].append(scene_id)
            table["feature"].append(features[instance == object_id].mean(axis=0))
            table["category"].append(str(labels[object_id]))
            table["colour"].append(str(colours[object_id]) if object_id in colours else None)
    return table


def probe(features: np.ndarray, classes: list[str], train: np.ndarray) -> dict:
    """Ridge one-vs-all read-out fitted on the `train` rows -> accuracies on both sides."""
    names = sorted(set(classes))
    target = np.eye(len(names))[[names.index(c) for c in classes]]
    mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-6
    x = np.concatenate([(features - mean) / std, np.ones((len(features), 1))], axis=1)
    weights = np.linalg.solve(
        x[train].T @ x[train] + RIDGE * np.eye(x.shape[1]), x[train].T @ target[train]
    )
    hit = (x @ weights).argmax(axis=1) == target.argmax(axis=1)
    commonest = target[train].sum(axis=0).argmax()
    return {
        "classes": len(names),
        "objects": f"{int(train.sum())} / {int((~train).sum())}",
        "train": float(hit[train].mean()),
        "held_out": float(hit[~train].mean()),
        "majority": float((target[~train].argmax(axis=1) == commonest).mean()),
    }


def probe_features(features_dir: str, scenes_dir: str | None, records: str) -> dict[str, dict]:
    """-> {attribute: probe(...)} for category and, where the scenes carry it, colour."""
    table = object_table(features_dir, scenes_dir)
    held_out = val_scenes(records)
    train = ~np.isin(np.array(table["scene"]), sorted(held_out))
    if train.all() or not train.any():
        raise InputError(records, "the probe needs both training and held-out (val) scenes")
    features = np.stack(table["feature"])
    out = {"category": probe(features, table["category"], train)}
    if all(c is not None for c in table["colour"]):
        out["colour"] = probe(features, table["colour"], train)
    return out


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| object attribute | classes | objects train / held-out | probe train | "
        "probe held-out | majority held-out |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['classes']} | {r['objects']} | {100 * r['train']:.1f} | "
            f"{100 * r['held_out']:.1f} | {100 * r['majority']:.1f} |"
        )
    return "\n".join(lines)
