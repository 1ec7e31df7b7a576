"""Scores a QA predictions file against a benchmark annotation file, ours or the release's way.

    python -m llm3d_jax.evaluate --task scanqa|sqa3d|3dmv_vqa --annotations GOLD.json \
        --predictions PRED [PRED ...] [--scoring release|ours]

GOLD.json: a JSON list of {question, answers[], ...} in the ScanQA layout the released 3D-LLM
reads (`ScanQA_v1.0_val.json`, `SQA_test.json`, 3DMV-VQA `test_questions.json`, whose entries
also carry an integer `type`). As in the release's scripts, the list is used exactly as given:
pass the entries the release evaluated (it drops those whose scene has no feature file first).

PRED, either format (detected from the content):
- a release result file: a JSON list of {"question_id", "answer"} where `question_id` is the
  position in the annotation list. Several files (one per rank) are read in order; a repeated
  question_id keeps its last answer, as the release's script does;
- our `predictions.jsonl` (experiments/eval.py): rows {"id", "dataset", "prediction", ...}
  matched to annotation entries by `question_id`: the row's own `question_id` when it has one
  (3DMV-VQA rows carry their record's meta.question_id), else its id `<dataset>-<question_id>`.
  An annotation entry without a question_id (3DMV-VQA's files) is matched by its position in the
  list, the number `python -m data_pipeline.language --import 3dmv_vqa` gives it.
Every annotation entry needs exactly one prediction.

Scoring `release` (calculate_score_{scanqa,sqa3d,3dmvvqa}.py): predictions cleaned by
`release_clean_answer`; EM is `release_exact_match`; BLEU-1..4, METEOR, ROUGE-L and CIDEr come
from pycocoevalcap on the PTB-tokenised cleaned predictions and raw answers; SQA3D types by
`sqa3d_release_question_type`, 3DMV-VQA types are `str(type)`, ScanQA has none (the release
scores it as one group). Scoring `ours` (experiments/eval.py): `<box>`/`<pt>` spans removed from
both sides, EM on stripped strings, SQA3D types from the first word of the question's last
sentence. Both report our EM-refined beside EM. Every type group is scored on its own (its own
BLEU corpus, its own CIDEr document frequencies), like the release's per-type tables; only types
that occur are reported (the release's script cannot score an empty group).
"""

from __future__ import annotations

import json
import os

from llm3d_jax.datasets import MV_VQA_QUESTION_TYPES
from llm3d_jax.evaluate.answers import (
    SQA3D_QUESTION_TYPES,
    SQA3D_RELEASE_QUESTION_TYPES,
    last_question,
    release_clean_answer,
    sqa3d_question_type,
    sqa3d_release_question_type,
    strip_locations,
)
from llm3d_jax.evaluate.captions import CAPTION_METRIC_NAMES, caption_metrics_by_group
from llm3d_jax.fileio import InputError

TASKS = ("scanqa", "sqa3d", "3dmv_vqa")
SCORINGS = ("release", "ours")
# 3DMV-VQA's question types as the release's script lists them (`str(entry["type"])`), and what
# each is (reported beside the scores as `type_names`).
MV_VQA_TYPES = ("0", "1", "2", "3")
MV_VQA_TYPE_NAMES = dict(zip(MV_VQA_TYPES, MV_VQA_QUESTION_TYPES))


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:  # a folder, no permission
        raise InputError(path, f"cannot read ({err.strerror or err})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_annotations(path: str, task: str) -> list[dict]:
    """The annotation list, each entry checked: a string `question`, a non-empty list of string
    `answers` (and an integer `type` for 3dmv_vqa)."""
    try:
        entries = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(path, f"not a JSON file ({err})") from None
    if not isinstance(entries, list) or not entries:
        raise InputError(path, "expected a non-empty JSON list of annotation entries")
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(path, f"entry {n} is not a JSON object")
        if not isinstance(entry.get("question"), str):
            raise InputError(path, f"entry {n} has no string `question`")
        answers = entry.get("answers")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise InputError(path, f"entry {n} needs `answers`, a non-empty list of strings")
        if task == "3dmv_vqa" and not _is_int(entry.get("type")):
            raise InputError(path, f"entry {n} has no integer `type` (the 3DMV-VQA question type)")
    return entries


def _parse_predictions(path: str):
    """-> ("release", list) or ("jsonl", [(line number, row)])."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        return "release", data
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"line {number}: neither a JSON list nor JSON lines ({err})"
            ) from None
        if not isinstance(row, dict):
            raise InputError(path, f"line {number}: a predictions.jsonl row must be a JSON object")
        rows.append((number, row))
    if not rows:
        raise InputError(path, "holds no predictions")
    return "jsonl", rows


def _from_release(path: str, items: list, count: int, answers: dict[int, str]) -> None:
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "question_id" not in item or "answer" not in item:
            raise InputError(path, f"entry {n}: expected an object with question_id and answer")
        qid, answer = item["question_id"], item["answer"]
        if not _is_int(qid):
            raise InputError(
                path, f"entry {n}: question_id must be an integer position, got {qid!r}"
            )
        if not 0 <= qid < count:
            raise InputError(
                path, f"entry {n}: question_id {qid} out of range (annotations hold {count})"
            )
        if not isinstance(answer, str):
            raise InputError(path, f"entry {n}: answer must be a string, got {answer!r}")
        answers[qid] = answer  # a repeat keeps the last answer, like the release's dict


def _from_jsonl(path: str, rows: list, annotations: list[dict], answers: dict[int, str]) -> None:
    position = {}
    for n, entry in enumerate(annotations):
        # An entry without its own question_id (3DMV-VQA's files) is numbered by its position,
        # as the release's scorer and our importer number it.
        key = str(entry.get("question_id", n))
        if key in position:
            raise InputError(path, f"question_id {key} appears twice in the annotations")
        position[key] = n
    for number, row in rows:
        rid, prediction = row.get("id"), row.get("prediction")
        if not isinstance(rid, str) or not isinstance(prediction, str):
            raise InputError(path, f"line {number}: needs string `id` and `prediction`")
        prefix = f"{row.get('dataset')}-"
        key = rid[len(prefix) :] if rid.startswith(prefix) else rid
        if row.get("question_id") is not None:
            key = str(row["question_id"])
        if key not in position:
            raise InputError(path, f"line {number}: id {rid!r} matches no annotation question_id")
        if position[key] in answers:
            raise InputError(path, f"line {number}: a second prediction for {rid!r}")
        answers[position[key]] = prediction


def load_predictions(paths: list[str], annotations: list[dict]) -> tuple[list[str], str]:
    """-> (one prediction per annotation entry, in annotation order; "release" or "jsonl")."""
    answers: dict[int, str] = {}
    formats = set()
    for path in paths:
        kind, data = _parse_predictions(path)
        formats.add(kind)
        if len(formats) > 1:
            raise InputError(path, "mixes a release result file with predictions.jsonl files")
        if kind == "release":
            _from_release(path, data, len(annotations), answers)
        else:
            _from_jsonl(path, data, annotations, answers)
    missing = [n for n in range(len(annotations)) if n not in answers]
    if missing:
        raise InputError(
            paths[0],
            f"{len(missing)} of {len(annotations)} annotation entries have no prediction "
            f"(positions {missing[:5]})",
        )
    return [answers[n] for n in range(len(annotations))], formats.pop()


def question_type(task: str, scoring: str, entry: dict) -> str | None:
    if task == "3dmv_vqa":
        return str(entry["type"])
    if task == "sqa3d":
        if scoring == "release":
            return sqa3d_release_question_type(entry["question"])
        return sqa3d_question_type(last_question(entry["question"]))
    return None  # ScanQA: one group


def _type_order(task: str, scoring: str) -> tuple[str, ...]:
    if task == "sqa3d":
        return SQA3D_RELEASE_QUESTION_TYPES if scoring == "release" else SQA3D_QUESTION_TYPES
    return MV_VQA_TYPES if task == "3dmv_vqa" else ()


def score(task: str, scoring: str, annotations: list[dict], predictions: list[str]) -> dict:
    """{"task", "scoring", "count", "metrics": {BLEU-1..4, METEOR, ROUGE-L, CIDEr, EM,
    EM-refined}, "by_type": {type: {..., "count"}}} (by_type only for tasks with types;
    3dmv_vqa also "type_names": {"0": "concept", ...})."""
    if task not in TASKS or scoring not in SCORINGS:
        raise ValueError(f"task must be one of {TASKS} and scoring one of {SCORINGS}")
    if len(predictions) != len(annotations):
        raise ValueError("one prediction per annotation entry")
    preds, refs, types = {}, {}, {}
    for n, (entry, pred) in enumerate(zip(annotations, predictions)):
        key = str(n)
        if scoring == "release":
            preds[key], refs[key] = release_clean_answer(pred), list(entry["answers"])
        else:
            preds[key] = strip_locations(pred)
            refs[key] = [strip_locations(a) for a in entry["answers"]]
        types[key] = question_type(task, scoring, entry)
    groups = {"All": (preds, refs)}
    found = {t for t in types.values() if t is not None}
    order = [t for t in _type_order(task, scoring) if t in found] + sorted(
        found - set(_type_order(task, scoring))
    )
    for name in order:
        keys = [k for k in preds if types[k] == name]
        groups[name] = ({k: preds[k] for k in keys}, {k: refs[k] for k in keys})
    # EM and EM-refined of `answer_metrics` on the scored strings; the release's EM replaces EM.
    scores = caption_metrics_by_group(groups)
    if scoring == "release":
        for name, (group_preds, group_refs) in groups.items():
            hits = [p in group_refs[k] for k, p in group_preds.items()]  # already cleaned
            scores[name]["EM"] = 100.0 * sum(hits) / len(hits)
    out = {
        "task": task,
        "scoring": scoring,
        "count": len(predictions),
        "metrics": {k: scores["All"][k] for k in CAPTION_METRIC_NAMES},
    }
    if order:
        out["by_type"] = {
            name: {
                "count": len(groups[name][0]),
                **{k: scores[name][k] for k in CAPTION_METRIC_NAMES},
            }
            for name in order
        }
    if task == "3dmv_vqa":
        out["type_names"] = {t: MV_VQA_TYPE_NAMES.get(t, "unknown") for t in order}
    return out
