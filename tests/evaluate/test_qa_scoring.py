"""`python -m llm3d_jax.evaluate`: the released 3D-LLM's ScanQA / SQA3D / 3DMV-VQA scoring and ours.

Fixtures (tests/fixtures/scoring): tiny annotation lists in the release's ScanQA layout, release
result files (question_id = position; the ScanQA one has a repeated id, as padded distributed
ranks leave, and is out of order) and one predictions.jsonl of ours. EM values are counted by
hand below; BLEU/METEOR/ROUGE-L/CIDEr are checked against pycocoevalcap driven the way the
release's `eval_pycoco` drives it (separate tokenizer calls for answers and predictions, one
scorer run per question-type group). Every full scoring run starts two JVMs, so each fixture is
scored once (module-scoped) and the EM-only cases replace the text scorers with a stub.
"""

import json
import os
import subprocess
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from llm3d_jax.evaluate import (
    CAPTION_METRIC_NAMES,
    answer_metrics,
    qa_scoring,
    release_clean_answer,
    release_exact_match,
    sqa3d_release_question_type,
)
from llm3d_jax.evaluate import __main__ as cli
from llm3d_jax.fileio import cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "scoring")
TEXT_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def fixture(name):
    return os.path.join(FIXTURES, name)


def load(task, annotations, *predictions):
    gold = qa_scoring.load_annotations(fixture(annotations), task)
    preds, kind = qa_scoring.load_predictions([fixture(p) for p in predictions], gold)
    return gold, preds, kind


def release_pycoco(cases):
    """The release's eval_pycoco for every (gold, cleaned predictions, groups) case, one
    tokenizer call per side and one METEOR JVM in all -> per case {group: {metric: x100}}.
    groups: name -> positions in the annotation list."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(
        {
            (c, n): [{"caption": a} for a in e["answers"]]
            for c, (gold, _, _) in enumerate(cases)
            for n, e in enumerate(gold)
        }
    )
    res = tokenizer.tokenize(
        {
            (c, n): [{"caption": p}]
            for c, (_, cleaned, _) in enumerate(cases)
            for n, p in enumerate(cleaned)
        }
    )
    meteor = Meteor()
    out = []
    try:
        for c, (_, _, groups) in enumerate(cases):
            out.append({})
            for name, positions in groups.items():
                g, r = {n: gts[(c, n)] for n in positions}, {n: res[(c, n)] for n in positions}
                bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
                scores = {f"BLEU-{i + 1}": 100 * b for i, b in enumerate(bleu)}
                scores["METEOR"] = 100 * meteor.compute_score(g, r)[0]
                scores["ROUGE-L"] = 100 * Rouge().compute_score(g, r)[0]
                scores["CIDEr"] = 100 * Cider().compute_score(g, r)[0]
                out[-1][name] = scores
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait()
    return out


@pytest.fixture(scope="module")
def references():
    """release_pycoco of the ScanQA and SQA3D release result files."""
    scanqa, scanqa_preds, _ = load("scanqa", "scanqa_val.json", "scanqa_release_result.json")
    sqa3d, sqa3d_preds, _ = load("sqa3d", "sqa3d_test.json", "sqa3d_release_result.json")
    sqa3d_groups = {"All": range(len(sqa3d))}
    for n, entry in enumerate(sqa3d):
        sqa3d_groups.setdefault(sqa3d_release_question_type(entry["question"]), []).append(n)
    cases = [
        (scanqa, [release_clean_answer(p) for p in scanqa_preds], {"All": range(len(scanqa))}),
        (sqa3d, [release_clean_answer(p) for p in sqa3d_preds], sqa3d_groups),
    ]
    scanqa_ref, sqa3d_ref = release_pycoco(cases)
    return {"scanqa": scanqa_ref, "sqa3d": sqa3d_ref}


def assert_text_metrics(ours, reference):
    for metric in TEXT_METRICS:
        assert ours[metric] == pytest.approx(reference[metric], abs=1e-6), metric


@pytest.fixture
def no_text_scorers(monkeypatch):
    def stub(groups):
        return {
            name: {**dict.fromkeys(TEXT_METRICS, 0.0), **answer_metrics(*group)}
            for name, group in groups.items()
        }

    monkeypatch.setattr(qa_scoring, "caption_metrics_by_group", stub)


# ---------------------------------------------------------------- formulas


def test_release_cleaning_and_em():
    assert release_clean_answer("<pad> brown chair</s>") == "brown chair"
    assert release_clean_answer("two, three,") == "two three"
    # first line after the strip; the line itself is not stripped again
    assert release_clean_answer("  on the table \nnext line") == "on the table "
    assert release_clean_answer("</s>") == ""
    assert release_exact_match("brown chair</s>", ["brown chair"])
    assert not release_exact_match("White", ["white"])  # case-sensitive
    assert not release_exact_match("black tv", [" black tv"])  # answers are not cleaned


def test_sqa3d_release_types_are_ordered_substring_tests():
    cases = {
        "I am facing the bed. What is on my left?": "What",
        "What I see is a desk. Is it clean?": "What",  # "What" is tested before "Is"
        "How many chairs? Which one is red?": "How",
        "Can I reach the window from here?": "Can",
        "Standing by the Island counter, how far is the fridge?": "Is",  # "Is" in "Island"
        "Which way should I go?": "Which",
        "Facing the bed, what colour is it?": "Other",  # lower-case "what" is no match
    }
    for question, expected in cases.items():
        assert sqa3d_release_question_type(question) == expected, question


# ---------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def scanqa_cli():
    """The ScanQA release file through the real command line (fresh process)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm3d_jax.evaluate",
            "--task",
            "scanqa",
            "--annotations",
            fixture("scanqa_val.json"),
            "--predictions",
            fixture("scanqa_release_result.json"),
            "--scoring",
            "release",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # stdout is exactly one JSON object


@pytest.mark.slow
def test_scanqa_release_em_and_pycocoevalcap(scanqa_cli, references):
    out = scanqa_cli
    assert out["predictions_format"] == "release" and out["count"] == 6
    assert "by_type" not in out  # the release scores ScanQA as one group
    assert list(out["metrics"]) == list(CAPTION_METRIC_NAMES)
    # hits: 0 (the repeat's last answer, "</s>" removed), 1 ("two, " -> "two"), 2 ("<pad>"
    # removed, first line); misses: 3 ("White"), 4 ("the cabinet"), 5 (answer " black tv")
    assert out["metrics"]["EM"] == pytest.approx(50.0)
    assert out["metrics"]["EM-refined"] == pytest.approx(100.0)
    gold, preds, _ = load("scanqa", "scanqa_val.json", "scanqa_release_result.json")
    cleaned = [release_clean_answer(p) for p in preds]
    assert cleaned[0] == "brown chair" and cleaned[2] == "on the left side of the table"
    assert_text_metrics(out["metrics"], references["scanqa"]["All"])


@pytest.fixture(scope="module")
def sqa3d_release():
    gold, preds, kind = load("sqa3d", "sqa3d_test.json", "sqa3d_release_result.json")
    assert kind == "release"
    return qa_scoring.score("sqa3d", "release", gold, preds)


@pytest.mark.slow
def test_sqa3d_release_per_type(sqa3d_release, references):
    out = sqa3d_release
    by_type = out["by_type"]
    # What: 0 lamp (hit), 7 no vs yes (miss); Other: 1 blue</s> (hit); How: 2 three vs two;
    # Can: 3 yes (hit); Is: 4 no (hit), 5 far vs close; Which: 6 "Right" vs "right" (miss)
    assert list(by_type) == ["What", "How", "Can", "Is", "Which", "Other"]
    counts = {k: v["count"] for k, v in by_type.items()}
    assert counts == {"What": 2, "How": 1, "Can": 1, "Is": 2, "Which": 1, "Other": 1}
    em = {k: v["EM"] for k, v in by_type.items()}
    assert em == pytest.approx(
        {"What": 50.0, "How": 0.0, "Can": 100.0, "Is": 50.0, "Which": 0.0, "Other": 100.0}
    )
    assert out["metrics"]["EM"] == pytest.approx(100 * 4 / 8)
    # refined EM also counts "Right"
    assert by_type["Which"]["EM-refined"] == pytest.approx(100.0)
    # one exact one-word answer: unigram precision 1 and LCS 1
    assert by_type["Can"]["BLEU-1"] == pytest.approx(100.0, abs=1e-4)
    assert by_type["Can"]["ROUGE-L"] == pytest.approx(100.0)
    reference = references["sqa3d"]
    assert set(reference) == {"All", *by_type}
    assert_text_metrics(out["metrics"], reference["All"])
    for name in by_type:
        assert_text_metrics(by_type[name], reference[name])


# ---------------------------------------------------------------- EM only (text scorers stubbed)


def test_scanqa_ours_from_predictions_jsonl(no_text_scorers):
    gold, preds, kind = load("scanqa", "scanqa_val.json", "scanqa_predictions.jsonl")
    assert kind == "jsonl"
    # rows are matched by question_id, not by order
    assert preds[5] == "black tv" and preds[0] == "brown chair"
    out = qa_scoring.score("scanqa", "ours", gold, preds)
    # hits: 0, 2 (<box> span removed), 5 (answers stripped); misses: 1 ("two,"), 3, 4
    assert out["metrics"]["EM"] == pytest.approx(50.0)
    assert out["metrics"]["EM-refined"] == pytest.approx(100.0)


def test_3dmv_vqa_release_types_from_the_type_field(no_text_scorers):
    gold, preds, _ = load("3dmv_vqa", "3dmv_vqa_test.json", "3dmv_vqa_release_result.json")
    out = qa_scoring.score("3dmv_vqa", "release", gold, preds)
    assert list(out["by_type"]) == ["0", "1", "3"]  # type 2 does not occur
    em = {k: v["EM"] for k, v in out["by_type"].items()}
    assert em == pytest.approx({"0": 100.0, "1": 50.0, "3": 0.0})
    assert out["metrics"]["EM"] == pytest.approx(50.0)
    assert out["type_names"] == {"0": "concept", "1": "counting", "3": "comparison"}


def test_3dmv_vqa_predictions_jsonl_match_by_position(no_text_scorers, tmp_path):
    """The annotation entries carry no question_id: our rows (question_id = the position the
    importer numbered the entry by) are matched by position, whatever their order."""
    rows = [
        {"id": f"3dmv_vqa-test-{n}", "dataset": "3dmv_vqa", "question_id": n, "prediction": p}
        for n, p in ((3, "no"), (0, "yes"), (2, "1"), (1, "2"))
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = qa_scoring.load_annotations(fixture("3dmv_vqa_test.json"), "3dmv_vqa")
    preds, kind = qa_scoring.load_predictions([str(path)], gold)
    assert kind == "jsonl" and preds == ["yes", "2", "1", "no"]
    out = qa_scoring.score("3dmv_vqa", "ours", gold, preds)
    em = {k: v["EM"] for k, v in out["by_type"].items()}
    assert em == pytest.approx({"0": 100.0, "1": 100.0, "3": 100.0})


def test_cross_formats_em(no_text_scorers):
    gold, preds, _ = load("scanqa", "scanqa_val.json", "scanqa_predictions.jsonl")
    # release cleaning of our rows: 0 hit, 1 "two," -> "two" hit, 2 keeps its <box> span,
    # 5 "black tv" is not " black tv"
    out = qa_scoring.score("scanqa", "release", gold, preds)
    assert out["metrics"]["EM"] == pytest.approx(100 * 2 / 6)
    gold, preds, _ = load("scanqa", "scanqa_val.json", "scanqa_release_result.json")
    # ours on the raw release answers: only 5 ("black tv" == " black tv" stripped)
    out = qa_scoring.score("scanqa", "ours", gold, preds)
    assert out["metrics"]["EM"] == pytest.approx(100 / 6)


def test_sqa3d_ours_types_from_the_first_word(no_text_scorers):
    gold, preds, _ = load("sqa3d", "sqa3d_test.json", "sqa3d_release_result.json")
    out = qa_scoring.score("sqa3d", "ours", gold, preds)
    counts = {k: v["count"] for k, v in out["by_type"].items()}
    # last sentence's first word: 7 is "is", 5 ("Standing ...") and 1 ("Facing ...") others
    assert counts == {"what": 1, "is": 2, "how": 1, "can": 1, "which": 1, "others": 2}
    # ours on raw answers: "blue</s>" misses, the rest as in the release
    assert out["metrics"]["EM"] == pytest.approx(100 * 3 / 8)


# ---------------------------------------------------------------- bad input


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(lambda: cli.main(list(argv)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def bad_case(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_annotations", "file not found"),
        ("missing_predictions", "file not found"),
        ("annotations_not_json", "not a JSON file"),
        ("predictions_not_json", "neither a JSON list nor JSON lines"),
        ("id_out_of_range", "question_id 6 out of range"),
        ("id_not_int", "question_id must be an integer"),
        ("prediction_missing", "1 of 6 annotation entries have no prediction"),
        ("no_answers", "entry 0 needs `answers`"),
        ("row_unmatched", "matches no annotation question_id"),
        ("row_repeated", "a second prediction"),
        ("no_type", "no integer `type`"),
        ("mixed_formats", "mixes a release result file"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, case, message):
    gold, task = fixture("scanqa_val.json"), "scanqa"
    release = json.loads(open(fixture("scanqa_release_result.json")).read())
    rows = open(fixture("scanqa_predictions.jsonl")).read().splitlines()
    preds = [fixture("scanqa_release_result.json")]
    if case == "missing_annotations":
        gold = str(tmp_path / "absent.json")
    elif case == "missing_predictions":
        preds = [str(tmp_path / "absent.json")]
    elif case == "annotations_not_json":
        gold = bad_case(tmp_path, "gold.json", '[{"question": "a"')
    elif case == "predictions_not_json":
        preds = [bad_case(tmp_path, "pred.json", "[1, 2\n")]
    elif case == "id_out_of_range":
        preds = [
            bad_case(
                tmp_path, "pred.json", json.dumps(release + [{"question_id": 6, "answer": "x"}])
            )
        ]
    elif case == "id_not_int":
        preds = [bad_case(tmp_path, "pred.json", json.dumps([{"question_id": "0", "answer": "x"}]))]
    elif case == "prediction_missing":
        preds = [bad_case(tmp_path, "pred.json", json.dumps(release[:-1]))]
    elif case == "no_answers":
        gold = bad_case(tmp_path, "gold.json", json.dumps([{"question": "q", "answers": []}]))
    elif case == "row_unmatched":
        preds = [bad_case(tmp_path, "pred.jsonl", rows[0].replace("scene0015-2", "scene0099-9"))]
    elif case == "row_repeated":
        preds = [bad_case(tmp_path, "pred.jsonl", "\n".join(rows + rows[:1]))]
    elif case == "no_type":
        task = "3dmv_vqa"
    elif case == "mixed_formats":
        preds = [preds[0], fixture("scanqa_predictions.jsonl")]
    code, out, err = run_cli(capsys, "--task", task, "--annotations", gold, "--predictions", *preds)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
