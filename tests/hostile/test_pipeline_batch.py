"""Issue 22, cases 7 (pipeline) and 8: batch commands skip and report a bad item, finish the rest.

tfds: feature files with NaN/Inf features or non-finite / out-of-range / non-integer voxels, and
a records line that is not UTF-8; language: a scene file renamed so its name is not its id.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from data_pipeline.scenes.synthetic import make_scene
from tests.hostile.pipeline_inputs import assert_no_traceback, run_module

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_tfds_fixtures import make_records, write_fixture  # noqa: E402
from test_tfds_fixtures import make_scene as make_feature_file  # noqa: E402

from llm3d_jax.fileio import save_npz_atomic, write_jsonl_atomic  # noqa: E402


def test_tfds_skips_bad_feature_files_and_a_non_utf8_line(tmp_path):
    features_dir, records_path, _, rows = write_fixture(
        str(tmp_path), num_scenes=2, records_per_scene=2
    )
    base = make_feature_file("bad", 30, 16, 5)
    nan_voxels = base["voxels"].astype(np.float32)
    nan_voxels[2, 1] = np.nan
    inf_features = base["features"].astype(np.float32)
    inf_features[0, 0] = np.inf
    bad = {
        "nan_voxels": {"voxels": nan_voxels},
        "big_voxels": {"voxels": base["voxels"].astype(np.int16) + 200},
        "negative_voxels": {"voxels": base["voxels"].astype(np.int32) - 1},
        "fraction_voxels": {"voxels": base["voxels"].astype(np.float32) + 0.5},
        "inf_features": {"features": inf_features},
        "scalar_voxels": {"voxels": np.array(7, np.uint8)},
        "wide_instance": {"instance": np.zeros((30, 2), np.int32)},
        "float_ids": {"object_ids": base["object_ids"].astype(np.float32) + 0.5},
    }
    for scene_id, changes in bad.items():
        save_npz_atomic(os.path.join(features_dir, scene_id + ".npz"), **{**base, **changes})
        rows += make_records(scene_id, base, 1, 100 + len(rows))
    write_jsonl_atomic(records_path, rows)
    with open(records_path, "ab") as f:
        f.write(b'{"id": "latin1", "prompt": "caf\xe9"}\n')
    with open(records_path, "a") as f:  # a good line after the bad one is still read
        f.write(json.dumps({**rows[0], "id": "after-the-bad-line"}) + "\n")
    out = tmp_path / "out"
    proc = run_module(
        "data_pipeline.tfds", "--features", features_dir, "--language", records_path,
        "--out", str(out), "--val-fraction", "0",
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "rejected: 8 scenes, 9 records" in proc.stdout, proc.stdout
    for scene_id in bad:  # each rejected file named on stderr, one line each
        path = os.path.join(features_dir, scene_id + ".npz")
        assert sum(line.startswith(f"warning: {path}: ") for line in proc.stderr.splitlines()) == 1
    with open(out / "build_report.synthetic.json") as f:
        report = json.load(f)
    reasons = {r["scene_id"]: r["reason"] for r in report["rejected_scenes"]}
    assert set(reasons) == set(bad)
    assert "NaN/Inf in voxels" in reasons["nan_voxels"]
    assert "voxels outside 0..255" in reasons["big_voxels"]
    assert "voxels outside 0..255" in reasons["negative_voxels"]
    assert "voxels must be integers" in reasons["fraction_voxels"]
    assert "NaN/Inf in features" in reasons["inf_features"]
    assert "voxels has shape []" in reasons["scalar_voxels"]
    assert "instance has shape [30, 2]" in reasons["wide_instance"]
    assert "object_ids must be integers" in reasons["float_ids"]
    (line,) = [r for r in report["rejected_records"] if r["id"] is None]
    assert line["reason"].startswith("invalid UTF-8") and line["line"] == len(rows) + 1
    assert report["counts"]["records"] == {"train": 2 * 2 + 1}


def test_language_skips_a_renamed_scene_file(tmp_path):
    scenes = tmp_path / "scenes"
    make_scene(6, 0).save(scenes)
    make_scene(6, 1).save(scenes)
    os.rename(scenes / "synth_0001.npz", scenes / "kitchen.npz")
    out = tmp_path / "r.jsonl"
    proc = run_module("data_pipeline.language", "--scenes", str(scenes), "--out", str(out))
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipped" in proc.stderr and "kitchen.npz" in proc.stderr
    assert "differs from the file name" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["scene_id"] for r in rows} == {"synth_0000"}
    with open(tmp_path / "r.stats.json") as f:
        assert list(json.load(f)["skipped_scenes"]) == ["kitchen"]


def test_tfds_negative_max_points_is_one_line(tmp_path):
    features_dir, records_path, _, _ = write_fixture(
        str(tmp_path), num_scenes=1, records_per_scene=1
    )
    proc = run_module(
        "data_pipeline.tfds", "--features", features_dir, "--language", records_path,
        "--out", str(tmp_path / "out"), "--max-points", "-1",
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: --max-points must be >= 0, got -1"]


def test_released_skips_an_unreadable_voxel_file(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "convert"))
    from test_pth import _tensor_pickle, _write_zip

    features, voxels = tmp_path / "pt", tmp_path / "npy"
    features.mkdir()
    voxels.mkdir()
    data = np.random.default_rng(0).normal(size=(4, 8)).astype("<f4")
    for name in ("a_garbage", "b_good"):
        _write_zip(
            features / f"{name}.pt", _tensor_pickle(0, (4, 8), (8, 1), 32), {"0": data.tobytes()}
        )
    (voxels / "a_garbage.npy").write_bytes(b"\x93NUMPY garbage that is not an array")
    np.save(voxels / "b_good.npy", np.arange(12).reshape(4, 3))
    proc = run_module(
        "data_pipeline.released", "--features", str(features), "--voxels", str(voxels),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert "1 imported, 1 failed" in proc.stdout
    assert f"error: {voxels / 'a_garbage.npy'}: " in proc.stderr


def test_language_revision_input_skips_a_non_utf8_line(tmp_path):
    scenes = tmp_path / "scenes"
    make_scene(6, 0).save(scenes)
    source = tmp_path / "source.jsonl"
    first = run_module(
        "data_pipeline.language",
        "--scenes",
        str(scenes),
        "--out",
        str(source),
        "--tasks",
        "caption",
    )
    assert first.returncode == 0, first.stderr
    with open(source, "ab") as f:
        f.write(b'{"id": "caf\xe9"}\n')
    out = tmp_path / "r.jsonl"
    proc = run_module(
        "data_pipeline.language", "--procedure", "revision", "--input", str(source),
        "--scenes", str(scenes), "--out", str(out),
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    n = len(source.read_bytes().splitlines())
    assert f"warning: {source}: line {n}: invalid UTF-8" in proc.stderr
    assert out.read_text().strip()


def test_language_import_input_that_is_a_folder_is_one_line(tmp_path):
    proc = run_module(
        "data_pipeline.language", "--import", "scanqa", "--input", str(tmp_path),
        "--out", str(tmp_path / "r.jsonl"),
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {tmp_path}: cannot read (Is a directory)"]
