"""Issue 22, cases 1 and 3: an id read from a file never becomes a path outside its folder.

Scene ids (meta.scene_id) and records' scene_id go through `fileio.child_path`; anything but a
plain file name is refused with one line and, in a batch, skipped and reported.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from data_pipeline.scenes import Scene
from data_pipeline.scenes.synthetic import make_scene
from llm3d_jax import fileio
from llm3d_jax.fileio import InputError
from tests.hostile.pipeline_inputs import (
    assert_no_traceback,
    error_lines,
    run_module,
    set_scene_id,
    tree,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
from test_tfds_fixtures import make_records, write_fixture  # noqa: E402
from test_tfds_fixtures import make_scene as make_feature_file  # noqa: E402

from llm3d_jax.fileio import save_npz_atomic, write_jsonl_atomic  # noqa: E402


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\0b", ".hidden", "a\nb", 7]
)
def test_child_path_refuses_everything_but_a_plain_name(tmp_path, name):
    with pytest.raises(InputError) as err:
        fileio.child_path(tmp_path, name, ".npz", source="records.jsonl")
    assert str(err.value).startswith("records.jsonl: id ") and "\n" not in str(err.value)


def test_child_path_keeps_plain_names(tmp_path):
    assert fileio.child_path(tmp_path, "scene0000_00", ".npz") == str(tmp_path / "scene0000_00.npz")
    assert fileio.child_path(tmp_path, "room a..b", "") == str(tmp_path / "room a..b")


@pytest.fixture
def hostile_scenes(tmp_path):
    """SCENES with one good scene and two whose meta.scene_id points outside; a victim file."""
    scenes, outside = tmp_path / "scenes", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.npz"
    victim.write_bytes(b"precious")
    make_scene(3, 0).save(scenes)
    for index, scene_id in ((1, str(outside / "victim")), (2, "../../escaped")):
        path = make_scene(3, index).save(scenes)
        set_scene_id(path, scene_id)
    return scenes, outside, victim


def test_scene_load_refuses_a_path_as_scene_id(hostile_scenes):
    scenes, _, _ = hostile_scenes
    with pytest.raises(InputError, match=r"synth_0002.npz: meta.scene_id '../../escaped' must not"):
        Scene.load(scenes / "synth_0002.npz")


def test_render_writes_nothing_outside_out(hostile_scenes, tmp_path):
    scenes, outside, victim = hostile_scenes
    before = tree(tmp_path)
    out = tmp_path / "views"
    proc = run_module(
        "data_pipeline.render", "--scenes", str(scenes), "--out", str(out),
        "--views", "1", "--width", "16", "--height", "12",
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert len(errors) == 2 and all("meta.scene_id" in e for e in errors), proc.stderr
    assert victim.read_bytes() == b"precious"
    assert tree(tmp_path) - before == {"views/synth_0000.npz", "views/synth_0000.png"}
    assert "rendered 1 of 3 scenes" in proc.stdout


def test_language_skips_scenes_with_a_path_as_scene_id(hostile_scenes, tmp_path):
    scenes, _, _ = hostile_scenes
    out = tmp_path / "records" / "r.jsonl"
    proc = run_module(
        "data_pipeline.language", "--scenes", str(scenes), "--out", str(out), "--tasks", "qa"
    )
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: skipped") == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["scene_id"] for r in rows} == {"synth_0000"}
    assert tree(tmp_path / "records") == {"r.jsonl", "r.stats.json", "r.lengths.png"}


def test_language_import_rejects_a_path_as_scene_id(tmp_path):
    entries = [
        {"scene_id": sid, "question_id": f"q{k}", "question": "what is it?",
         "answers": ["a chair"], "object_ids": [], "object_names": []}
        for k, sid in enumerate(["scene0000_00", "../outside/escape", "/etc/passwd"])
    ]  # fmt: skip
    (tmp_path / "scanqa.json").write_text(json.dumps(entries))
    out = tmp_path / "r.jsonl"
    proc = run_module(
        "data_pipeline.language", "--import", "scanqa",
        "--input", str(tmp_path / "scanqa.json"), "--out", str(out),
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["scene_id"] for line in out.read_text().splitlines()] == [
        "scene0000_00"
    ]
    assert "2 entries skipped" in proc.stdout


def test_tfds_reads_nothing_outside_features(tmp_path):
    features_dir, records_path, scenes, rows = write_fixture(
        str(tmp_path / "in"), num_scenes=2, records_per_scene=2
    )
    outside = tmp_path / "outside"
    escape = make_feature_file("escape", 30, 16, 9)
    save_npz_atomic(outside / "escape.npz", **escape)
    bad = make_records("x", escape, 2, 500)
    bad[0]["scene_id"] = "../outside/escape"
    bad[1]["scene_id"] = str(outside / "escape")
    write_jsonl_atomic(records_path, rows + bad)
    out = tmp_path / "out"
    proc = run_module(
        "data_pipeline.tfds", "--features", features_dir, "--language", records_path,
        "--out", str(out), "--val-fraction", "0",
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "rejected: 0 scenes, 2 records" in proc.stdout
    with open(out / "build_report.synthetic.json") as f:
        report = json.load(f)
    reasons = {r["id"]: r["reason"] for r in report["rejected_records"]}
    assert all(reasons[r["id"]].startswith("bad scene id") for r in bad)
    assert report["counts"]["scenes"] == {"train": 2}
    assert report["bytes"]["raw_npz"] == sum(
        os.path.getsize(os.path.join(features_dir, f)) for f in os.listdir(features_dir)
    )
    assert np.isfinite(report["bytes"]["per_scene_raw_npz"])
