"""tools/where_questions: colour-and-category questions on unseen rooms, and their score."""

import json

import numpy as np
import pytest

from llm3d_jax.fileio import InputError
from tools import where_questions


def test_questions_name_objects_alone_and_score_boxes(tmp_path, capsys):
    features, scenes = tmp_path / "features", tmp_path / "scenes"
    features.mkdir(), scenes.mkdir()
    boxes = np.array([[0, 0, 0, 1, 1, 1], [2, 2, 0, 3, 3, 1], [4, 4, 0, 5, 5, 1]], np.float32)
    np.savez(
        features / "room.npz",
        object_ids=np.array([1, 2, 3], np.int32),
        object_labels=np.array(["chair", "chair", "lamp"]),
        object_boxes=boxes,
    )
    # two red chairs: neither is named alone; the blue lamp is
    np.savez(
        scenes / "room.npz",
        object_ids=np.array([1, 2, 3], np.int32),
        object_colors=np.array(["red", "red", "blue"]),
    )
    out = tmp_path / "q.jsonl"
    argv = ["make", "--features", str(features), "--scenes", str(scenes), "--out", str(out)]
    assert where_questions.main(argv) == 0
    (question,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert question["question"] == "Where is the blue lamp?" and question["task"] == "grounding"
    assert question["box"] == [4, 4, 0, 5, 5, 1]

    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"id": question["id"], "boxes": [[4, 4, 0, 5, 5, 0.5]]}) + "\n")
    capsys.readouterr()
    assert where_questions.main(["score", "--questions", str(out), "--answers", str(answers)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["Acc@0.25"] == 100.0 and result["Acc@0.5"] == 100.0
    assert result["without box (%)"] == 0.0 and result["count"] == 1
    answers.write_text("")  # no answer: no box, IoU 0
    where_questions.main(["score", "--questions", str(out), "--answers", str(answers)])
    result = json.loads(capsys.readouterr().out)
    assert result["Acc@0.25"] == 0.0 and result["without box (%)"] == 100.0
    with pytest.raises(InputError, match="file not found"):
        where_questions.main(["score", "--questions", str(out), "--answers", str(tmp_path / "x")])
