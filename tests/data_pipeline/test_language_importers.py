"""Importers on small fixtures in the exact public formats, through the command line and back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.language import importers
from data_pipeline.language.__main__ import main
from data_pipeline.language.records import parse_locations, read_records
from data_pipeline.scenes import Scene, SceneObject
from llm3d_jax.fileio import InputError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "language")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fixture(name):
    return os.path.join(FIXTURES, name)


def load(name):
    with open(fixture(name)) as f:
        return json.load(f)


def run_import(tmp_path, *args):
    out = tmp_path / "out.jsonl"
    assert main([*args, "--out", str(out)]) == 0
    records, problems = read_records(out)
    assert problems == []
    return records


def save_scenes(directory):
    """scene0000_00 with a chair (id 3) and a lamp (id 5); scene0001_00 with a bed (id 1)."""
    boxes = {
        3: [1.0, 1.0, 0.0, 1.5, 1.6, 0.9],
        5: [2.0, 1.0, 0.75, 2.3, 1.3, 1.2],
        1: [0.0, 0.0, 0.0, 2.0, 1.6, 0.6],
    }
    for sid, objs in (
        ("scene0000_00", [(3, "chair"), (5, "lamp")]),
        ("scene0001_00", [(1, "bed")]),
    ):
        verts = np.concatenate([np.array(boxes[i]).reshape(2, 3) for i, _ in objs]).astype(
            np.float32
        )
        verts = np.concatenate([verts, verts[:1] + 0.01])
        inst = np.array([i for i, _ in objs for _ in range(2)] + [objs[0][0]], np.int32)
        Scene(
            sid,
            verts,
            np.array([[0, 1, 2]], np.int32),
            np.zeros_like(verts, dtype=np.uint8),
            inst,
            [SceneObject(i, label, np.array(boxes[i], np.float32), "") for i, label in objs],
            {"source": "scannet"},
        ).save(directory)
    return boxes


def test_scanqa_round_trip(tmp_path):
    src = load("scanqa_val.json")
    records = run_import(
        tmp_path, "--import", "scanqa", "--input", fixture("scanqa_val.json"), "--split", "val"
    )
    assert len(records) == 3  # the test-split entry (no answers) and the empty answer are skipped
    for r, e in zip(records, src):
        assert r["id"] == f"scanqa-{e['question_id']}" and r["scene_id"] == e["scene_id"]
        assert (r["task"], r["source"]) == ("qa", "scanqa")
        assert r["prompt"] == e["question"] and r["answers"] == e["answers"]
        assert r["object_ids"] == e["object_ids"] and r["meta"]["object_names"] == e["object_names"]
        assert r["meta"]["question_id"] == e["question_id"] and r["meta"]["split"] == "val"
    _, problems = importers.import_scanqa(fixture("scanqa_val.json"))
    assert problems == [
        "entry 3: question test-scene0002_00-0 has no answers (test split?)",
        "entry 4: empty or non-string answer ''",
    ]
    records, problems = importers.import_scanqa(
        fixture("scanqa_val.json"), known_scenes={"scene0000_00"}
    )
    assert len(records) == 2 and "unknown scene 'scene0001_00'" in problems[0]


def test_sqa3d_join_round_trip(tmp_path):
    qs = load("sqa3d_questions.json")["questions"]
    ann = {a["question_id"]: a for a in load("sqa3d_annotations.json")["annotations"]}
    records = run_import(
        tmp_path,
        "--import",
        "sqa3d",
        "--input",
        fixture("sqa3d_questions.json"),
        "--annotations",
        fixture("sqa3d_annotations.json"),
    )
    assert len(records) == 2  # the third question has no annotation
    for r, q in zip(records, qs):
        a = ann[q["question_id"]]
        assert (
            r["id"] == f"sqa3d-{q['question_id']}"
            and r["scene_id"] == q["scene_id"]
            and r["source"] == "sqa3d"
        )
        assert r["prompt"] == f"{q['situation']} {q['question']}"
        assert r["answers"] == list(dict.fromkeys(x["answer"] for x in a["answers"]))
        m = r["meta"]
        assert (m["situation"], m["question"], m["question_id"]) == (
            q["situation"],
            q["question"],
            q["question_id"],
        )
        assert (m["position"], m["rotation"]) == (a["position"], a["rotation"])
        assert (m["answer_type"], m["question_type"]) == (a["answer_type"], a["question_type"])
    assert records[0]["answers"] == ["table"]  # duplicate answers collapsed
    _, problems = importers.import_sqa3d(
        fixture("sqa3d_questions.json"), fixture("sqa3d_annotations.json")
    )
    assert problems == ["entry 2: question 220602000002 has no annotation"]


def test_scanrefer_boxes_come_from_the_scene(tmp_path):
    boxes = save_scenes(tmp_path / "scenes")
    src = load("scanrefer_val.json")
    records = run_import(
        tmp_path,
        "--import",
        "scanrefer",
        "--input",
        fixture("scanrefer_val.json"),
        "--scenes",
        str(tmp_path / "scenes"),
    )
    assert len(records) == 3
    for r, e in zip(records, src):
        assert (r["task"], r["source"], r["scene_id"]) == ("grounding", "scanrefer", e["scene_id"])
        assert r["id"] == f"scanrefer-{e['scene_id']}-{e['object_id']}-{e['ann_id']}"
        assert r["prompt"] == "Find the object: " + " ".join(e["description"].split())
        assert r["object_ids"] == [int(e["object_id"])]
        np.testing.assert_allclose(
            parse_locations(r["answers"][0])[0][0], boxes[int(e["object_id"])], atol=0.006
        )
        assert r["meta"]["object_name"] == e["object_name"] and r["meta"]["ann_id"] == e["ann_id"]
    _, problems = importers.import_scanrefer(
        fixture("scanrefer_val.json"),
        lambda sid: Scene.load(tmp_path / "scenes" / f"{sid}.npz"),
        {"scene0000_00", "scene0001_00"},
    )
    assert problems == [
        "entry 3: scene scene0000_00 has no object 42",
        "entry 4: unknown scene 'scene0009_00'",
    ]


def test_3dllm_release_map_either_way(tmp_path):
    src = load("3dllm_data.json")
    records = run_import(
        tmp_path,
        "--import",
        "3dllm",
        "--input",
        fixture("3dllm_data.json"),
        "--scene-map",
        fixture("3dllm_scene_map.json"),
    )
    assert [r["scene_id"] for r in records] == ["scene0000_00", "scene0001_00"]
    assert [r["task"] for r in records] == ["qa", "dialogue"]
    for r, e in zip(records, src):
        assert (
            r["prompt"] == e["question"] and r["answers"] == e["answers"] and r["source"] == "3dllm"
        )
        assert r["meta"]["release_scene_id"] == e["scene_id"]
    inverted = tmp_path / "map.json"
    inverted.write_text(json.dumps({"0": "scene0000_00", "1": "scene0001_00"}))
    again, problems = importers.import_3dllm(fixture("3dllm_data.json"), inverted)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    assert problems == ["entry 2: scene id 7 is not in the map file"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(InputError, match="bad.json: not a JSON file"):
        importers.import_scanqa(bad)
    bad.write_text('{"questions": 3}')
    with pytest.raises(InputError, match='expected a JSON object with a list "questions"'):
        importers.import_sqa3d(bad, fixture("sqa3d_annotations.json"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.language",
            "--import",
            "sqa3d",
            "--input",
            fixture("sqa3d_questions.json"),
            "--out",
            str(tmp_path / "x.jsonl"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (
        proc.returncode == 1 and proc.stderr.strip() == "error: --import sqa3d needs --annotations"
    )
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_3dmv_vqa_types_and_positions(tmp_path):
    records = run_import(
        tmp_path, "--import", "3dmv_vqa", "--input", fixture("3dmv_vqa_questions.json")
    )
    # numbered by list position (the release's scorer's numbering), the file named in the id
    assert [r["meta"]["question_id"] for r in records] == list(range(6))
    assert [r["id"] for r in records] == [f"3dmv_vqa-3dmv_vqa_questions-{n}" for n in range(6)]
    assert [r["meta"]["question_type"] for r in records] == [
        "concept",
        "counting",
        "relation",
        "comparison",
        "concept",
        "counting",
    ]
    assert [r["meta"]["type"] for r in records] == [0, 1, 2, 3, 0, 1]
    assert all((r["task"], r["source"]) == ("qa", "3dmv_vqa") for r in records)
    assert records[0]["scene_id"] == "00009-vLpv2VX547B_0"
    assert records[0]["prompt"] == "Is there a sofa in the room?"
    assert records[2]["answers"] == ["nightstand", "lamp"]
    # the 3D-CLR generator's form: one answer (a bool, a count) and family_id
    assert records[4]["answers"] == ["no"] and records[5]["answers"] == ["2"]
    # the train and test files share positions, not ids (they go into one TFDS build)
    train = tmp_path / "train_questions.json"
    train.write_text(open(fixture("3dmv_vqa_questions.json")).read())
    again, _ = importers.import_3dmv_vqa(train)
    assert not {r["id"] for r in again} & {r["id"] for r in records}
    _, problems = importers.import_3dmv_vqa(fixture("3dmv_vqa_questions.json"))
    assert problems == [
        "entry 6: missing field 'scene_id'",
        "entry 7: type 7 is not one of 0..3 (concept, counting, relation, comparison)",
    ]


def test_objaverse_chatcaptioner_folder_and_file(tmp_path):
    folder = fixture("objaverse_captions")
    records = run_import(tmp_path, "--import", "objaverse", "--input", folder)
    uids = ["2c7934a650eb46f08ad3902f8bda548e", "3cdb6b2dcc274e05b8dee1497ec6a54b"]
    assert [r["scene_id"] for r in records] == uids
    for r in records:
        assert (r["task"], r["source"], r["id"]) == (
            "object_caption",
            "objaverse",
            f"objaverse-{r['scene_id']}",
        )
        assert r["prompt"] == "Describe the 3D scene."  # the release's object prompt
    assert records[1]["answers"] == [
        "A wooden chair with a red cushioned seat and four straight legs."
    ]
    _, problems = importers.import_objaverse_captions(folder)
    assert problems == [
        "09e3e887cfb34dacb12a857dd9482e85.json: entry 0: missing field 'scene_caption_outside'"
    ]
    one, problems = importers.import_objaverse_captions(
        os.path.join(folder, uids[1] + ".json"), known_scenes={uids[1]}
    )
    assert [r["id"] for r in one] == [records[1]["id"]] and problems == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty: no .json files"):
        importers.import_objaverse_captions(empty)
