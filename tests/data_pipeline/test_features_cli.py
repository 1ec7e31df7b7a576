"""`python -m data_pipeline.features` and `python -m data_pipeline.released` end to end."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import features, released
from data_pipeline.render import render_scene
from data_pipeline.scenes.synthetic import make_scene
from llm3d_jax.fileio import InputError, cli_main

SMALL = ["--views", "2", "--width", "48", "--height", "36", "--encoder", "random-vit:16"]


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Two good synthetic rooms (views rendered by the CLI) and one whose views have NaN depth."""
    root = tmp_path_factory.mktemp("scenes")
    for index in range(3):
        make_scene(0, index).save(root)
    bad = make_scene(0, 2)
    views = render_scene(bad, 2, 48, 36)
    depth = views.depth.copy()
    depth[0, 3, 4] = np.nan
    dataclasses.replace(views, depth=depth).save(root / "views")
    return root


def check_feature_file(path, scene):
    data = dict(np.load(path, allow_pickle=False))
    n = len(data["points"])
    assert n > 100
    assert data["points"].dtype == np.float32 and data["points"].shape == (n, 3)
    assert data["features"].dtype == np.float16 and data["features"].shape == (n, 16)
    np.testing.assert_allclose(
        np.linalg.norm(data["features"].astype(np.float32), axis=1), 1, atol=2e-3
    )
    assert data["voxels"].dtype == np.uint8
    voxel = np.floor((data["points"] - data["grid_origin"]) / data["grid_voxel"])
    np.testing.assert_array_equal(data["voxels"], voxel)
    assert data["colors"].dtype == np.uint8 and data["instance"].dtype == np.int32
    assert set(np.unique(data["instance"])) <= {-1} | {o.id for o in scene.objects}
    np.testing.assert_array_equal(data["object_ids"], [o.id for o in scene.objects])
    assert list(data["object_labels"]) == [o.label for o in scene.objects]
    np.testing.assert_array_equal(data["object_boxes"], [o.box for o in scene.objects])
    # The grid covers the scene: 256 voxels span its largest extent.
    extent = scene.vertices.max(0) - scene.vertices.min(0)
    assert 256 * data["grid_voxel"] >= extent.max()
    return json.loads(str(data["meta"]))


@pytest.mark.parametrize("method", ["direct", "fusion"])
def test_batch_writes_contract_files_isolates_failures_and_resumes(
    scenes_dir, tmp_path, capsys, method
):
    out = tmp_path / "features"
    args = ["--scenes", str(scenes_dir), "--method", method, "--out", str(out), *SMALL]
    assert features.main(args) == 1  # the NaN scene failed, the others were written
    err = capsys.readouterr().err
    assert "error: " in err and "synth_0002" in err and "NaN/inf" in err
    assert sorted(os.listdir(out)) == ["synth_0000.npz", "synth_0001.npz"]
    for index in range(2):
        meta = check_feature_file(out / f"synth_000{index}.npz", make_scene(0, index))
        assert meta["method"] == method and meta["encoder"] == "random-vit:16"
        assert meta["dim"] == 16 and meta["scene_id"] == f"synth_000{index}"
    stamps = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    assert features.main(args) == 1
    assert "2 already done" in capsys.readouterr().out
    assert stamps == {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}


def test_mask_files_and_a_wrong_shape(scenes_dir, tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for name in ("synth_0000.npz", "synth_0001.npz"):
        shutil.copy(scenes_dir / name, scenes)
    masks = tmp_path / "masks"
    masks.mkdir()
    labels = np.zeros((2, 36, 48), np.int32)
    labels[:, :, 24:] = 1  # two half-frame segments per view
    np.savez(masks / "synth_0000.npz", masks=labels)
    np.savez(masks / "synth_0001.npz", masks=labels[:, :30])
    out = tmp_path / "out"
    args = ["--scenes", str(scenes), "--method", "direct", "--out", str(out), "--masks", str(masks)]
    assert features.main([*args, *SMALL, "--preview"]) == 1
    err = capsys.readouterr().err
    assert "synth_0001.npz: masks label map has shape (2, 30, 48), expected (2, 36, 48)" in err
    assert sorted(os.listdir(out)) == ["synth_0000.npz", "synth_0000.png"]
    assert (out / "synth_0000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two segments per view: at most 4 distinct feature rows before voxel averaging.
    data = np.load(out / "synth_0000.npz")
    assert len(np.unique(data["features"], axis=0)) > 1


def test_encoder_of_the_wrong_kind_is_one_line(scenes_dir, tmp_path, capsys, goldens_dir):
    clip = os.path.join(goldens_dir, "vit", "clip_vision")
    argv = ["--scenes", str(scenes_dir), "--method", "direct", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: features.main([*argv, "--encoder", f"blip2:{clip}"]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a blip2 checkpoint" in err[0] and "clip_vision" in err[0]
    with pytest.raises(SystemExit):
        cli_main(lambda: features.main([*argv, "--encoder", "resnet"]))
    assert "expected random-vit[:D], vit:DIR, blip2:DIR or clip:DIR" in capsys.readouterr().err


def test_released_features_import(goldens_dir, tmp_path, capsys):
    fixture = os.path.join(goldens_dir, "vit", "released")
    expected = np.load(os.path.join(fixture, "expected.npz"))
    voxels = tmp_path / "voxels"
    shutil.copytree(os.path.join(fixture, "voxels"), voxels)
    feats = tmp_path / "features"
    shutil.copytree(os.path.join(fixture, "features"), feats)
    shutil.copy(feats / "scene0000_00.pt", feats / "scene0001_00.pt")
    np.save(voxels / "scene0001_00.npy", np.zeros((5, 3), np.int64))  # wrong length
    scene = dataclasses.replace(make_scene(0, 0), scene_id="scene0000_00")
    scenes = tmp_path / "scenes"
    scene.save(scenes)
    out = tmp_path / "out"
    argv = ["--features", str(feats), "--voxels", str(voxels), "--out", str(out)]
    assert released.main([*argv, "--scenes", str(scenes)]) == 1
    assert "scenes/scene0001_00.npz: file not found" in capsys.readouterr().err
    data = dict(np.load(out / "scene0000_00.npz"))
    keep = np.arange(40) != 3  # the all-zero row is dropped
    want = expected["features"][keep] / np.linalg.norm(expected["features"][keep], axis=1)[:, None]
    np.testing.assert_allclose(data["features"].astype(np.float32), want, atol=2e-3)
    np.testing.assert_array_equal(data["voxels"], expected["voxels"][keep])
    voxel = np.floor((data["points"] - data["grid_origin"]) / data["grid_voxel"])
    np.testing.assert_array_equal(voxel, expected["voxels"][keep])
    # The scene's grid: origin at its AABB minimum, 256 voxels along its largest extent.
    np.testing.assert_array_equal(data["grid_origin"], scene.vertices.min(0))
    extent = (scene.vertices.max(0) - scene.vertices.min(0)).max()
    assert float(data["grid_voxel"]) == pytest.approx(extent / 256, rel=1e-5)
    assert json.loads(str(data["meta"]))["metric"] is True
    np.testing.assert_array_equal(data["object_ids"], [o.id for o in scene.objects])
    # Without scene files: unit-cube grid, no objects.
    assert released.main([*argv, "--out", str(tmp_path / "unit")]) == 1
    err = capsys.readouterr().err
    assert "scene0001_00.npy: voxels have shape (5, 3), expected (40, 3)" in err
    unit = dict(np.load(tmp_path / "unit" / "scene0000_00.npz"))
    assert float(unit["grid_voxel"]) == pytest.approx(1 / 256)
    assert unit["object_ids"].shape == (0,) and json.loads(str(unit["meta"]))["metric"] is False


def test_balanced_cap_is_recorded_and_a_different_sampling_is_not_resumed(scenes_dir, tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(scenes_dir / "synth_0000.npz", scenes)
    out = tmp_path / "out"
    args = ["--scenes", str(scenes), "--method", "fusion", "--out", str(out), *SMALL]
    assert features.main([*args, "--max-points", "64", "--balance"]) == 0
    data = np.load(out / "synth_0000.npz")
    meta = json.loads(str(data["meta"]))
    assert meta["max_points"] == 64 and meta["balance"] is True
    assert len(data["points"]) == 64
    # each instance (the background counts as one) keeps min(its voxels, an equal share)
    full = tmp_path / "full"
    assert (
        features.main(["--scenes", str(scenes), "--method", "fusion", "--out", str(full), *SMALL])
        == 0
    )
    owners, voxels = np.unique(np.load(full / "synth_0000.npz")["instance"], return_counts=True)
    assert len(owners) >= 3
    kept = {i: int((data["instance"] == i).sum()) for i in owners}
    assert all(kept[i] >= min(n, 64 // len(owners)) for i, n in zip(owners, voxels))
    stamp = os.stat(out / "synth_0000.npz").st_mtime_ns
    assert features.main([*args, "--max-points", "64", "--balance"]) == 0
    assert os.stat(out / "synth_0000.npz").st_mtime_ns == stamp  # same settings: resumed
    assert features.main([*args, "--max-points", "64"]) == 0
    meta = json.loads(str(np.load(out / "synth_0000.npz")["meta"]))
    assert meta["balance"] is False  # other settings: written again
    with pytest.raises(InputError, match="--balance shares out --max-points"):
        features.main([*args, "--balance"])
