"""experiments/eval.py's grouping of prediction rows into metrics (hand-made rows, no model)."""

import os

import pytest

from experiments.eval import (
    SCANQA_VAL,
    SCANREFER_ACC25,
    compute_metrics,
    last_question,
    markdown,
    question_fields,
    strip_locations,
)


def _row(i, dataset, task, prompt, prediction, answers, boxes=()):
    return dict(
        id=f"{dataset}-{i}",
        dataset=dataset,
        task=task,
        prompt=prompt,
        prediction=prediction,
        answers=answers,
        boxes=[list(b) for b in boxes],
    )


def test_helpers():
    assert (
        strip_locations("the chair <box>0 0 0 1 1 1</box> near <pt>1 2 3</pt>.")
        == "the chair near ."
    )
    assert (
        last_question("I face the bed. The door is behind me. What is on my left?")
        == "What is on my left?"
    )


def test_compute_metrics_groups_sqa3d_types_and_grounding():
    rows = [
        _row(0, "sqa3d", "qa", "I sit on the bed. What is on my left?", "lamp", ["lamp"]),
        _row(1, "sqa3d", "qa", "I stand at the door. Is the window open?", "no", ["yes"]),
        _row(2, "sqa3d", "qa", "I face the desk. How many chairs are there?", "two", ["two"]),
        _row(
            3,
            "scanrefer",
            "grounding",
            "the red chair",
            "<box>0 0 0 1 1 1</box>",
            ["<box>0.000 0.000 0.000 1.000 1.000 1.000</box>"],
            [(0, 0, 0, 1, 1, 1)],
        ),
        _row(4, "scanrefer", "grounding", "the table", "", ["<box>0 0 0 2 2 2</box>"]),
        _row(5, "scanrefer", "grounding", "no box in the answer", "", ["a chair"]),
        # 3DMV-VQA: types from the rows' question_type (the records' meta)
        dict(
            _row(6, "3dmv_vqa", "qa", "Is there a sofa?", "yes", ["yes"]), question_type="concept"
        ),
        dict(_row(7, "3dmv_vqa", "qa", "How many beds?", "3", ["2"]), question_type="counting"),
        dict(_row(8, "3dmv_vqa", "qa", "How many lamps?", "1", ["1"]), question_type="counting"),
    ]
    out = compute_metrics(rows)
    assert list(out) == ["3dmv_vqa/qa", "scanrefer/grounding", "sqa3d/qa"]
    mv = out["3dmv_vqa/qa"]
    assert mv["count"] == 3 and mv["EM"] == pytest.approx(200 / 3)
    assert mv["EM/concept"] == 100.0 and mv["EM/counting"] == 50.0 and "EM/relation" not in mv
    qa = out["sqa3d/qa"]
    assert qa["count"] == 3 and qa["EM"] == pytest.approx(200 / 3)
    assert qa["EM/what"] == 100.0 and qa["EM/is"] == 0.0 and qa["EM/how"] == 100.0
    ground = out["scanrefer/grounding"]
    # One exact box, one missing prediction (IoU 0); the row without a GT box is skipped.
    assert ground["count"] == 2 and ground["skipped_without_gt_box"] == 1
    assert ground["Acc@0.25"] == 50.0 and ground["Acc@0.5"] == 50.0 and ground["mIoU"] == 50.0
    table = markdown(out, "test")
    assert (
        "| sqa3d/qa | 3 |" in table and "| scanrefer/grounding | 2 | 50.0 | 50.0 | 50.0 |" in table
    )
    assert "ScanRefer Acc@0.25: 3D-LLM 30.3" in table
    assert "| 3dmv_vqa/qa | counting | 50.0 |" in table and "| sqa3d/qa | what | 100.0 |" in table
    assert "Published, ScanQA validation (docs/reference.md):" in table


def test_published_numbers_match_docs_reference():
    """The numbers eval.py prints beside ours are the ones docs/reference.md gives, with sources."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "reference.md"), encoding="utf-8") as f:
        reference = f.read()
    for name, values in SCANQA_VAL.items():
        cells = " | ".join("-" if v is None else f"{v}" for v in values)
        assert f"| {name} | {cells} |" in reference
    scanrefer = ", ".join(f"{k} {v}" for k, v in SCANREFER_ACC25.items())
    assert f"ScanRefer Acc@0.25 (x100): {scanrefer}." in reference


def test_question_types_come_from_the_records_meta(tmp_path):
    """Prediction rows of 3DMV-VQA get the question type and id the importer put in meta."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data_pipeline"))
    from test_tfds_fixtures import write_fixture

    from data_pipeline.tfds import build
    from llm3d_jax.fileio import write_jsonl_atomic

    features, _, _, rows = write_fixture(str(tmp_path), num_scenes=2, records_per_scene=2)
    kinds = ["concept", "counting", "relation", "comparison"]
    rows = [
        {
            **r,
            "source": "3dmv_vqa",
            "meta": {"question_type": kinds[k], "question_id": k, "split": "val"},
        }
        for k, r in enumerate(rows)
    ]
    records = str(tmp_path / "mv.jsonl")
    write_jsonl_atomic(records, rows)
    build(features, records, str(tmp_path / "tfds"), "3dmv_vqa")
    fields = question_fields(str(tmp_path / "tfds"), "3dmv_vqa", "validation")
    assert fields == {
        r["id"]: {"question_type": kinds[k], "question_id": k} for k, r in enumerate(rows)
    }
