"""tools/oracle_grounding.py: the oracle features name each point's object exactly."""

import json
import types

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
    # with the relational questions, blind: their exact match is reported too
    og.main(["data", "--rooms", "2", "--seed", "1000", "--out", str(data / "train"), "--relations"])
    og.main(["data", "--rooms", "1", "--seed", "2000", "--out", str(data / "test"), "--relations"])
    run = ["train", "--data", str(data), "--steps", "2", "--batch-size", "2", "--blind"]
    assert og.main([*run, "--boxes-in-prompt", "--set", "loc_table_dim=21"]) == 0
    out = capsys.readouterr().out
    assert "blind (features and voxels zero)" in out and "boxes in relational prompts" in out
    assert "relations EM" in out.splitlines()[-1]


def test_extents_with_perfect_ratings_the_widest_region_is_the_plain_box(tmp_path, capsys):
    og.make_data(3, 2000, str(tmp_path / "test"))
    assert og.main(["extents", "--data", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perfect")]
    acc = [float(line.split("Acc@0.25 ")[1].split(",")[0]) for line in lines]
    assert len(acc) == 4 and "links <= 16" in lines[0] and "all rated points" in lines[3]
    assert acc[0] <= acc[1] <= acc[2] <= acc[3] and acc[3] >= 50, lines


def test_relational_questions_answer_in_words_and_score_by_exact_match(tmp_path, monkeypatch):
    og.make_data(3, 1000, str(tmp_path / "rel"), relations=True)
    records = [json.loads(line) for line in (tmp_path / "rel.jsonl").read_text().splitlines()]
    qa = [r for r in records if "answer" in r]
    assert qa and all(r["qtype"] in og.RELATIONAL and "box" not in r for r in qa)
    assert len(qa) < len(records)  # the grounding questions stay
    data = dict(np.load(tmp_path / "rel.npz"))
    words = og.Words()
    x = og.batch(data, qa[:4], words, np.random.default_rng(0))
    for row, r in enumerate(qa[:4]):
        ids = og.answer_ids(r, words)
        said = [i for i in ids if i != og.PAD]
        assert said[-1] == og.EOS and len(said) == len(r["answer"].split()) + 1
        np.testing.assert_array_equal(x["answer_mask"][row], np.arange(og.ANSWER_LEN) < len(said))
    # the named objects' boxes at the end of a relational prompt, in the record's order
    boxed = og.batch(data, qa[:4] + records[:1], words, np.random.default_rng(0), boxes=True)
    assert boxed["prompt_ids"].shape[1] == og.PROMPT_LEN + 20
    for row, r in enumerate(qa[:4]):
        ids = boxed["prompt_ids"][row][boxed["prompt_mask"][row]]
        room = data["voxels"][r["room"]].astype(int)
        expected = []
        for i in r["ids"]:
            points = room[data["instance"][r["room"]] == i]
            expected += [og.LOC_OFFSET + v for v in (*points.min(0), *points.max(0))]
        assert ids[-1] == og.EOS and ids[-1 - len(expected) : -1].tolist() == expected
    plain = og.batch(data, records[:1], words, np.random.default_rng(0))
    grounding_row = boxed["prompt_ids"][4][boxed["prompt_mask"][4]]
    np.testing.assert_array_equal(grounding_row, plain["prompt_ids"][0][plain["prompt_mask"][0]])
    blind = og.batch(data, qa[:4], words, np.random.default_rng(0), blind=True)
    assert not blind["features"].any() and not blind["voxels"].any()
    np.testing.assert_array_equal(blind["prompt_ids"], x["prompt_ids"])

    # the score: an answer equal to the truth counts, one word off does not
    def answers(right):
        def fake_generate(module, params, inputs, config):
            rows = []
            for r in part_of(inputs):
                ids = [i for i in og.answer_ids(r, words) if i != og.PAD]
                rows.append(ids if right else [ids[0] + 1, *ids[1:]])
            return np.asarray([row + [og.PAD] * (og.ANSWER_LEN - len(row)) for row in rows]), None

        return fake_generate

    part_of = lambda inputs: qa[: len(inputs["prompt_ids"])]
    for right, expected in ((True, 100.0), (False, 0.0)):
        monkeypatch.setattr(og, "generate", answers(right))
        module = types.SimpleNamespace(config=types.SimpleNamespace(target_tokens=0))
        out = og.held_out_accuracy(module, None, data, qa[:20], words, by_type=True)
        assert out["relations EM"] == expected
        assert any(k.endswith(" EM") and k != "relations EM" for k in out)
