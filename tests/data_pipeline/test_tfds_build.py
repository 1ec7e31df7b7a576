"""TFDS build: every field round-trips, bad items are rejected with reasons, splits by scene, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_tfds_fixtures import box_text, make_records, make_scene, write_fixture

from data_pipeline.tfds import CONFIGS, build
from data_pipeline.tfds.build import split_by_hash
from llm3d_jax.data.sources import SceneJoin, dataset_metadata, language_record, scene_record
from llm3d_jax.fileio import InputError, save_npz_atomic, write_jsonl_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tfds"))
    features_dir, records, scenes, rows = write_fixture(root, num_scenes=6, records_per_scene=3)
    out = os.path.join(root, "out")
    report = build(features_dir, records, out, val_fraction=0.34, seed=1)
    return out, report, scenes, rows


def test_every_field_round_trips(built):
    out, report, scenes, rows = built
    by_id = {r["id"]: r for r in rows}
    seen = set()
    for split in ("train", "validation"):
        join = SceneJoin.open(out, "synthetic", split)
        for i in range(len(join)):
            record, scene = join[i]
            want = by_id[record["id"]]
            seen.add(record["id"])
            for key in ("scene_id", "task", "prompt", "answers", "source", "meta"):
                assert record[key] == want[key], key
            np.testing.assert_array_equal(record["object_ids"], want["object_ids"])
            src = scenes[record["scene_id"]]
            for key in src:
                got = scene[key]
                if key == "meta":
                    assert got == str(src[key])
                else:
                    assert (
                        np.asarray(got).dtype == np.asarray(src[key]).dtype
                        or key == "object_labels"
                    )
                    np.testing.assert_array_equal(got, src[key], err_msg=key)
            assert scene["scene_id"] == record["scene_id"]
    assert seen == set(by_id)  # nothing lost, nothing rejected
    assert report["counts"]["rejected_records"] == 0 and report["counts"]["dim"] == 16


def test_split_is_by_scene_and_seeded(built):
    out, report, scenes, _ = built
    for split in ("train", "validation"):
        join = SceneJoin.open(out, "synthetic", split)
        ids = {join.language[i]["scene_id"].decode() for i in range(len(join))}
        assert all(split_by_hash(s, 0.34, 1) == split for s in ids)
        stored = [scene_record(join.scenes[k])["scene_id"] for k in range(len(join.scenes))]
        assert stored == sorted(ids)  # each scene stored once per split, in key order
    assert sum(report["counts"]["scenes"].values()) == len(scenes)
    assert [split_by_hash(f"s{i}", 0.5, 3) for i in range(20)] != [
        split_by_hash(f"s{i}", 0.5, 4) for i in range(20)
    ]


def test_metadata_and_readable_by_name_and_directory(built):
    out, _, _, _ = built
    meta = dataset_metadata(out, "synthetic")
    assert meta["dim"] == 16
    assert meta["prompt_templates"] == dict(CONFIGS["synthetic"].prompt_templates)
    builder = tfds.builder_from_directory(os.path.join(out, "llm3d_language", "synthetic", "1.0.0"))
    source = builder.as_data_source(split="train")
    assert language_record(source[0])["id"]
    assert "tensorflow" not in sys.modules


def test_rejections_counted_with_reasons(tmp_path):
    root = str(tmp_path)
    features_dir, records, scenes, rows = write_fixture(root, num_scenes=3, records_per_scene=2)
    dim = 16

    def add_scene(scene_id, **changes):
        scene = {**make_scene(scene_id, 30, dim, 7), **changes}
        save_npz_atomic(os.path.join(features_dir, scene_id + ".npz"), **scene)
        return make_records(scene_id, scene, 1, 900 + len(rows))

    nan = make_scene("x", 30, dim, 7)["features"].copy()
    nan[3, 2] = np.nan
    inf_points = make_scene("x", 30, dim, 7)["points"].copy()
    inf_points[0, 0] = np.inf
    rows += add_scene("scene_nan", features=nan)
    rows += add_scene("scene_inf", points=inf_points)
    rows += add_scene("scene_wide", features=np.zeros((30, dim + 1), np.float16))
    rows += add_scene("scene_short", voxels=np.zeros((29, 3), np.uint8))
    base = rows[0]
    rows += [
        {**base, "id": "missing", "scene_id": "scene_nope"},
        {**base, "id": "empty", "answers": []},
        {**base, "id": "blank", "answers": ["ok", "  "]},
        {**base, "id": "task", "task": "dance"},
        {**base, "id": base["id"]},  # duplicate id
        {**base, "id": "badbox", "answers": ["<box>1 2 3</box>"]},
        {**base, "id": "source", "source": "scanqa"},
        {**base, "id": "split", "meta": {"split": "test"}},
    ]
    path = os.path.join(root, "records.jsonl")
    write_jsonl_atomic(path, rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    report = build(features_dir, path, os.path.join(root, "out"), val_fraction=0.0)

    scene_reasons = {r["scene_id"]: r["reason"] for r in report["rejected_scenes"]}
    assert "NaN/Inf in features" in scene_reasons["scene_nan"]
    assert "NaN/Inf in points" in scene_reasons["scene_inf"]
    assert "wrong feature width: 17 (dataset has 16)" in scene_reasons["scene_wide"]
    assert "voxels has shape [29, 3]" in scene_reasons["scene_short"]
    reasons = {r["id"]: r["reason"] for r in report["rejected_records"]}
    assert reasons["missing"].startswith("missing scene")
    assert reasons["empty"].startswith("empty answers") and reasons["blank"].startswith(
        "empty answers"
    )
    assert reasons["task"].startswith("unknown task")
    assert reasons[base["id"]].startswith("duplicate id")
    assert (
        reasons["badbox"].startswith("bad location placeholder")
        and "6 numbers" in reasons["badbox"]
    )
    assert reasons["source"].startswith("wrong source")
    assert reasons["split"].startswith("bad split")
    assert reasons[None].startswith("invalid JSON")
    for scene_id in ("scene_nan", "scene_inf", "scene_wide", "scene_short"):
        (record_id,) = [r["id"] for r in rows if r["scene_id"] == scene_id]
        assert reasons[record_id] == f"scene rejected: {scene_reasons[scene_id]}"
    n_good = 3 * 2
    assert report["counts"]["records"] == {"train": n_good}
    assert report["counts"]["rejected_scenes"] == 4
    assert report["counts"]["rejected_records"] == 4 + 9
    assert report["rejected_reasons"]["scene NaN/Inf in features"] == 1
    with open(os.path.join(root, "out", "build_report.synthetic.json")) as f:
        assert json.load(f)["counts"] == report["counts"]


def test_given_split_kept_and_max_points(tmp_path):
    root = str(tmp_path)
    features_dir, _, scenes, rows = write_fixture(
        root, num_scenes=2, records_per_scene=2, num_points=50
    )
    for r in rows:
        r["meta"]["split"] = "val" if r["scene_id"].endswith("1_00") else "train"
    path = os.path.join(root, "records.jsonl")
    write_jsonl_atomic(path, rows)
    out = os.path.join(root, "out")
    report = build(features_dir, path, out, val_fraction=0.0, max_points=20)
    assert report["counts"]["records"] == {"train": 2, "validation": 2}
    record, scene = SceneJoin.open(out, "synthetic", "validation")[0]
    src = scenes[record["scene_id"]]
    assert len(scene["points"]) == 20
    # The kept points are real rows of the file, with their features, voxels and instance.
    rows_of = {tuple(p): i for i, p in enumerate(src["points"])}
    idx = np.array([rows_of[tuple(p)] for p in scene["points"]])
    np.testing.assert_array_equal(scene["features"], src["features"][idx])
    np.testing.assert_array_equal(scene["voxels"], src["voxels"][idx])
    np.testing.assert_array_equal(scene["instance"], src["instance"][idx])
    with pytest.raises(InputError, match="already built"):
        build(features_dir, path, out)


def test_box_records_keep_metres(tmp_path):
    root = str(tmp_path)
    features_dir, _, scenes, rows = write_fixture(root, num_scenes=1, records_per_scene=1)
    scene_id = next(iter(scenes))
    assert rows[0]["answers"] == [box_text(scenes[scene_id]["object_boxes"][0])]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.tfds", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_cli_builds_and_reports(tmp_path):
    features_dir, records, _, _ = write_fixture(str(tmp_path), num_scenes=2, records_per_scene=2)
    out = str(tmp_path / "out")
    run = _cli(
        "--features", features_dir, "--language", records, "--out", out, "--config", "synthetic"
    )
    assert run.returncode == 0, run.stderr
    assert "built synthetic" in run.stdout and "serialized" in run.stdout
    assert os.path.isdir(os.path.join(out, "llm3d_scenes", "synthetic", "1.0.0"))


def test_cli_bad_input_one_line(tmp_path):
    features_dir, _, _, _ = write_fixture(str(tmp_path), num_scenes=1, records_per_scene=1)
    missing = str(tmp_path / "nope.jsonl")
    run = _cli("--features", features_dir, "--language", missing, "--out", str(tmp_path / "o"))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == f"error: {missing}: file not found"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run = _cli("--features", features_dir, "--language", str(empty), "--out", str(tmp_path / "o"))
    assert run.returncode == 1 and "no valid records" in run.stderr
    # Progress bars share stderr; the error is one line, the last.
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [run.stderr.strip().splitlines()[-1]] and "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "o" / "llm3d_scenes" / "synthetic" / "1.0.0")
