import json

import numpy as np
import pytest

from data_pipeline.language.records import (
    format_box,
    format_point,
    make_record,
    parse_locations,
    read_records,
    validate_record,
)
from llm3d_jax.fileio import InputError


def good(**changes):
    record = make_record(
        "scene0000_00",
        "grounding",
        "Where is the chair?",
        [format_box([0, 1, 0, 0.5, 1.5, 0.9])],
        [3],
        "template",
        {"qtype": "ground"},
    )
    record.update(changes)
    return record


def test_make_record_has_exactly_the_design_fields_and_validates():
    r = good()
    assert list(r) == [
        "id",
        "scene_id",
        "task",
        "prompt",
        "answers",
        "object_ids",
        "source",
        "meta",
    ]
    validate_record(r, known_scenes={"scene0000_00"})
    assert r["id"] == good()["id"]  # content id: stable
    other = make_record("scene0000_00", "qa", "Is there a chair?", ["no"], source="template")
    assert other["id"] != r["id"]


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"task": "summarise"}, "unknown task 'summarise'"),
        ({"source": "gpt"}, "unknown source"),
        ({"answers": []}, "answers must be a non-empty list"),
        ({"answers": ["  "]}, "empty or non-string answer"),
        ({"answers": [3]}, "empty or non-string answer"),
        ({"answers": "yes"}, "answers must be a non-empty list"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"object_ids": ["3"]}, "object_ids must be a list of integers"),
        ({"object_ids": [True]}, "object_ids must be a list of integers"),
        ({"meta": []}, "meta must be a JSON object"),
        ({"split": "train"}, "unknown fields ['split']"),
        ({"answers": ["<box>0 1 0 0.5 1.5</box>"]}, "<box> needs 6 numbers, got 5"),
        ({"answers": ["<box>0 1 0 0.5 1.5 0.9 1</box>"]}, "<box> needs 6 numbers, got 7"),
        ({"answers": ["<box>0 1 0 a 1.5 0.9</box>"]}, "non-number 'a'"),
        ({"answers": ["<box>0 1 0 0.5 1.5 nan</box>"]}, "non-number 'nan'"),
        ({"answers": ["<box>1 1 0 0.5 1.5 0.9</box>"]}, "min exceeds max"),
        ({"prompt": "go to <pt>1 2</pt>"}, "malformed location in prompt: <pt> needs 3 numbers"),
        ({"prompt": "go to <pt>1 2 0"}, "unmatched <pt>"),
        ({"answers": ["<box>0 1 0 <pt>1 1 1</pt> 0.5 1.5 0.9</box>"]}, "nested"),
    ],
)
def test_validation_rejects_with_the_reason(changes, reason):
    with pytest.raises(ValueError, match=None) as err:
        validate_record(good(**changes))
    assert reason in str(err.value)


def test_missing_field_and_unknown_scene():
    r = good()
    del r["meta"]
    with pytest.raises(ValueError, match=r"missing fields \['meta'\]"):
        validate_record(r)
    with pytest.raises(ValueError, match="unknown scene 'scene0000_00'"):
        validate_record(good(), known_scenes={"scene0001_00"})
    validate_record(good())  # no known set given: any scene id


def test_locations_round_trip():
    box = [-1.234, 0.5, 0.0, 2.0, 3.456, 1.0]
    text = f"the chair {format_box(box)} then {format_point([1, 2, 0])}"
    boxes, points = parse_locations(text)
    np.testing.assert_allclose(boxes, [box], atol=0.005)
    np.testing.assert_allclose(points, [[1, 2, 0]])
    assert parse_locations("no locations")[0].shape == (0, 6)


def test_read_records_reports_bad_lines_and_keeps_the_rest(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [
        json.dumps(good()),
        "{not json",
        json.dumps(good(task="nope")),
        "",
        json.dumps(good(prompt="Find it.")),
    ]
    path.write_text("\n".join(lines) + "\n")
    records, problems = read_records(path)
    assert [r["prompt"] for r in records] == ["Where is the chair?", "Find it."]
    assert problems[0].startswith("line 2: not JSON")
    assert problems[1].startswith("line 3: unknown task 'nope'")
    with pytest.raises(InputError, match="file not found"):
        read_records(tmp_path / "missing.jsonl")
