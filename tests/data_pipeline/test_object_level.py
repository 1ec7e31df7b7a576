"""Object-level scenes (3D-LLM's Objaverse data): one object per scene file, object_caption
records, through features, language and TFDS; the released object features imported."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import features, released
from data_pipeline.language import offline
from data_pipeline.language.records import validate_record
from data_pipeline.scenes import Scene
from data_pipeline.scenes.synthetic import main as synthetic_main
from data_pipeline.scenes.synthetic import make_object_scene
from data_pipeline.tfds import build
from llm3d_jax.data.sources import SceneJoin
from llm3d_jax.fileio import write_jsonl_atomic

SMALL = ["--views", "2", "--width", "48", "--height", "36", "--encoder", "random-vit:16"]


def test_synthetic_object_scene_is_one_object_alone(tmp_path):
    scene = make_object_scene(0, 1)
    assert scene.scene_id == "synth_obj_0001" and scene.meta["level"] == "object"
    assert len(scene.objects) == 1 and scene.objects[0].id == 0
    assert set(np.unique(scene.instance)) == {0}  # no floor, no walls
    box = scene.objects[0].box
    np.testing.assert_allclose(box[[0, 1, 3, 4]], -box[[3, 4, 0, 1]], atol=1e-6)  # centred
    assert box[2] == 0.0  # resting on z = 0
    assert (
        synthetic_main(["--num-scenes", "2", "--seed", "0", "--objects", "--out", str(tmp_path)])
        == 0
    )
    again = Scene.load(tmp_path / "synth_obj_0001.npz")
    np.testing.assert_array_equal(again.vertices, scene.vertices)
    assert again.meta["level"] == "object"
    first = (tmp_path / "synth_obj_0001.npz").read_bytes()
    make_object_scene(0, 1).save(tmp_path / "again")
    assert (tmp_path / "again" / "synth_obj_0001.npz").read_bytes() == first  # byte-identical


def test_object_scene_to_features_records_and_tfds(tmp_path):
    scenes = tmp_path / "scenes"
    for index in range(2):
        make_object_scene(0, index).save(scenes)
    out = tmp_path / "features"
    assert (
        features.main(["--scenes", str(scenes), "--method", "direct", "--out", str(out), *SMALL])
        == 0
    )
    records = []
    for index in range(2):
        scene = make_object_scene(0, index)
        data = dict(np.load(out / f"{scene.scene_id}.npz", allow_pickle=False))
        # the scene-file contract with one object: every lifted point is on it
        np.testing.assert_array_equal(data["object_ids"], [0])
        assert list(data["object_labels"]) == [scene.objects[0].label]
        assert set(np.unique(data["instance"])) <= {-1, 0} and (data["instance"] == 0).any()
        assert json.loads(str(data["meta"]))["level"] == "object"
        made = offline.generate(scene)
        assert [r["task"] for r in made] == ["object_caption"]  # no room tasks
        o = scene.objects[0]
        assert made[0]["prompt"] == "Describe the 3D scene."
        assert made[0]["answers"] == [offline.article(f"{o.color} {o.label}") + "."]
        validate_record(made[0])
        records += made
    # the same object called a room makes no object_caption record
    room = dataclasses.replace(make_object_scene(0, 0), meta={"source": "synthetic"})
    assert offline.generate(room, tasks=("object_caption",)) == []
    path = tmp_path / "records.jsonl"
    write_jsonl_atomic(path, [{**r, "meta": {**r["meta"], "split": "train"}} for r in records])
    report = build(str(out), str(path), str(tmp_path / "tfds"), "synthetic")
    assert report["counts"]["records"] == {"train": 2}
    record, scene_row = SceneJoin.open(str(tmp_path / "tfds"), "synthetic", "train")[0]
    assert record["task"] == "object_caption" and len(scene_row["object_ids"]) == 1


def test_released_objaverse_features_become_one_object_files(goldens_dir, tmp_path, capsys):
    fixture = os.path.join(goldens_dir, "vit", "released")
    uid = "3cdb6b2dcc274e05b8dee1497ec6a54b"
    feats, points = tmp_path / "features", tmp_path / "points"
    feats.mkdir()
    points.mkdir()
    shutil.copy(os.path.join(fixture, "features", "scene0000_00.pt"), feats / f"{uid}_outside.pt")
    shutil.copy(os.path.join(fixture, "voxels", "scene0000_00.npy"), points / f"{uid}_outside.npy")
    out = tmp_path / "out"
    argv = ["--features", str(feats), "--voxels", str(points), "--out", str(out), "--objects"]
    assert released.main(argv) == 0
    data = dict(np.load(out / f"{uid}.npz", allow_pickle=False))
    np.testing.assert_array_equal(data["object_ids"], [0])
    assert list(data["object_labels"]) == ["object"]
    assert (data["instance"] == 0).all()
    box = data["object_boxes"][0]
    np.testing.assert_array_equal(
        box, np.concatenate([data["points"].min(0), data["points"].max(0)])
    )
    meta = json.loads(str(data["meta"]))
    assert meta["scene_id"] == uid and meta["level"] == "object"
    with pytest.raises(SystemExit):  # --objects takes no --scenes: one line, exit 1
        from llm3d_jax.fileio import cli_main

        cli_main(lambda: released.main([*argv, "--scenes", str(tmp_path)]))
    assert "--objects imports lone objects" in capsys.readouterr().err
