"""The feature probe reads out what the features carry on held-out scenes, and only that."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import feature_probe
from data_pipeline.language.records import make_record

CATEGORIES = ["chair", "table", "lamp", "bed"]
COLOURS = ["red", "blue", "green"]
REPO = pathlib.Path(__file__).resolve().parents[1]


def write_scenes(root, carries: str, scenes: int = 12, seed: int = 0):
    """Feature files where `carries` ("category" or "colour") is one-hot in the features and
    the other attribute is absent (noise only); scene files with the colours."""
    rng = np.random.default_rng(seed)
    (root / "features").mkdir()
    (root / "scenes").mkdir()
    records = []
    for s in range(scenes):
        scene_id = f"synth_{s:04d}"
        ids = np.arange(6)
        labels = rng.choice(CATEGORIES, len(ids))
        colours = rng.choice(COLOURS, len(ids))
        instance = np.repeat(np.append(ids, -1), 10)
        features = rng.normal(0, 0.3, (len(instance), 8)).astype(np.float32)
        for i in ids:
            dim = (
                CATEGORIES.index(labels[i]) if carries == "category" else COLOURS.index(colours[i])
            )
            features[instance == i, dim] += 1.0
        np.savez(
            root / "features" / f"{scene_id}.npz",
            features=features,
            instance=instance,
            object_ids=ids,
            object_labels=labels,
        )
        np.savez(root / "scenes" / f"{scene_id}.npz", object_ids=ids, object_colors=colours)
        split = "val" if s >= scenes - 4 else "train"
        records.append(
            make_record(scene_id, "qa", "Is there a chair?", ["yes"], meta={"split": split})
        )
    (root / "language.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(root / "features"), str(root / "scenes"), str(root / "language.jsonl")


@pytest.mark.parametrize("carries, absent", [("category", "colour"), ("colour", "category")])
def test_the_probe_recovers_what_the_features_carry_and_not_more(tmp_path, carries, absent):
    results = feature_probe.probe_features(*write_scenes(tmp_path, carries))
    assert results[carries]["held_out"] > 0.95
    assert results[absent]["held_out"] < 0.6  # chance is 1/4 or 1/3; noise features
    assert results[carries]["objects"] == "48 / 24"


def test_colour_is_left_out_without_scene_colours_and_bad_records_fail(tmp_path):
    features, _, records = write_scenes(tmp_path, "category")
    assert list(feature_probe.probe_features(features, None, records)) == ["category"]
    all_train = tmp_path / "all_train.jsonl"
    record = make_record("synth_0000", "qa", "Is there a chair?", ["yes"], meta={"split": "train"})
    all_train.write_text(json.dumps(record) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "tools.probe_features", "--features", features],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.probe_features",
            "--features",
            features,
            "--records",
            str(all_train),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {all_train}: the probe needs both training and held-out (val) scenes"
    ]
