"""tools/oracle_grounding.py: the oracle features name each point's object exactly."""

import json

import numpy as np
import pytest

from tools import oracle_grounding as og


def test_oracle_rooms_one_hot_per_point_and_boxes_on_the_grid(tmp_path):
    og.make_data(2, 1000, str(tmp_path / "train"))
    data = dict(np.load(tmp_path / "train.npz"))
    assert data["features"].shape == (2, og.STORED, og.WIDTH)
    kinds = data["features"][..., : len(og.CATEGORIES) + 2]
    colours = data["features"][..., len(og.CATEGORIES) + 2 :]
    np.testing.assert_array_equal(kinds.sum(-1), 1)  # one category (or floor / wall) per point
    np.testing.assert_array_equal(colours.sum(-1), data["instance"] >= 0)  # objects: a colour
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert records
    for r in records:
        box = np.asarray(r["box"])
        assert (box[:3] <= box[3:]).all() and box.min() >= 0 and box.max() <= 255
        # the named object's points lie inside its box (voxel units; float32 vs float64 floor: 1)
        inside = data["voxels"][r["room"]][np.isin(data["instance"][r["room"]], r["ids"])]
        inside = inside.astype(int)
        assert len(inside) and (inside >= box[:3] - 1).all() and (inside <= box[3:] + 1).all()


def _lifted_feature_files(folder, rooms, seed, width=8):
    """Feature files as python -m data_pipeline.features writes them (the keys this tool reads),
    for rooms 0..rooms-1 of `seed`: the oracle's points, random features."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(rooms):
        scene = og.synthetic.make_scene(seed, index)
        voxels, instance, _, (origin, voxel) = og.room_points(scene, rng)
        np.savez(
            folder / f"synth_{index:04d}.npz",
            features=rng.normal(size=(len(instance), width)).astype(np.float16),
            voxels=voxels,
            instance=instance,
            grid_origin=np.asarray(origin, np.float32),
            grid_voxel=np.float32(voxel),
        )


def test_lifted_features_replace_the_one_hots_on_the_same_rooms_and_questions(tmp_path):
    _lifted_feature_files(tmp_path / "features", 2, 1000)
    og.make_data(2, 1000, str(tmp_path / "oracle"))
    og.make_data(2, 1000, str(tmp_path / "lifted"), str(tmp_path / "features"))
    lifted = dict(np.load(tmp_path / "lifted.npz"))
    assert lifted["features"].shape == (2, og.STORED, 8) and lifted["features"].dtype == np.float32
    for room in range(2):
        stored = np.load(tmp_path / "features" / f"synth_{room:04d}.npz")
        rows = {tuple(v): f for v, f in zip(stored["voxels"].tolist(), stored["features"])}
        for v, f in zip(lifted["voxels"][room].tolist(), lifted["features"][room]):
            np.testing.assert_array_equal(f, rows[tuple(v)].astype(np.float32))
    read = lambda name: (tmp_path / f"{name}.jsonl").read_text().splitlines()
    assert read("oracle") == read("lifted")  # same questions, same boxes: only features differ
    (tmp_path / "features" / "synth_0001.npz").write_bytes(b"not an npz")
    with pytest.raises(og.InputError, match="synth_0001.npz"):
        og.make_data(2, 1000, str(tmp_path / "bad"), str(tmp_path / "features"))


def test_training_reports_the_answers_and_the_rated_points_box(tmp_path, capsys):
    data = tmp_path / "data"
    og.main(["data", "--rooms", "2", "--seed", "1000", "--out", str(data / "train")])
    og.main(["data", "--rooms", "1", "--seed", "2000", "--out", str(data / "test")])
    settings = ["--set", "target_tokens=8", "--set", "loc_table_dim=21"]
    assert (
        og.main(["train", "--data", str(data), "--steps", "2", "--batch-size", "2", *settings]) == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step 2: answer loss") and "rated Acc@0.25" in last, last


def test_extents_with_perfect_ratings_the_widest_region_is_the_plain_box(tmp_path, capsys):
    og.make_data(3, 2000, str(tmp_path / "test"))
    assert og.main(["extents", "--data", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perfect")]
    acc = [float(line.split("Acc@0.25 ")[1].split(",")[0]) for line in lines]
    assert len(acc) == 4 and "links <= 16" in lines[0] and "all rated points" in lines[3]
    assert acc[0] <= acc[1] <= acc[2] <= acc[3] and acc[3] >= 50, lines
