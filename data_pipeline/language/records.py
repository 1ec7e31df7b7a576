"""The language record (docs/architecture.md contract): construction, validation, JSONL reading.

One record is one JSON object:
    {"id", "scene_id", "task", "prompt", "answers": [str, ...], "object_ids": [int, ...],
     "source", "meta": {}}
Locations inside `prompt` and `answers` are metres, grid-independent:
`<box>x0 y0 z0 x1 y1 z1</box>` (an AABB, min corner first) and `<pt>x y z</pt>` (a point).
`meta.split` ("train" or "val") is written by the command line; readers default to "train".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable

import numpy as np

from llm3d_jax.fileio import InputError, name_problem

TASKS = (
    "caption",
    "dense_caption",
    "qa",
    "grounding",
    "task_decomposition",
    "dialogue",
    "navigation",
    "affordance",
    "object_caption",  # a scene file holding one object (Objaverse-like): what it is
)
SOURCES = (
    "boxes_demo",
    "chatcaptioner",
    "revision",
    "template",
    "scanqa",
    "sqa3d",
    "scanrefer",
    "3dllm",
    "3dmv_vqa",
    "objaverse",
)
FIELDS = ("id", "scene_id", "task", "prompt", "answers", "object_ids", "source", "meta")

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_PLACEHOLDER = re.compile(r"<(box|pt)>(.*?)</\1>", re.DOTALL)
_TAG = re.compile(r"</?(?:box|pt)>")
_WIDTH = {"box": 6, "pt": 3}


def format_box(box) -> str:
    """`<box>x0 y0 z0 x1 y1 z1</box>` in metres with centimetre precision."""
    b = np.asarray(box, np.float64).reshape(6)
    return "<box>" + " ".join(f"{v:.2f}" for v in b) + "</box>"


def format_point(point) -> str:
    """`<pt>x y z</pt>` in metres with centimetre precision."""
    p = np.asarray(point, np.float64).reshape(3)
    return "<pt>" + " ".join(f"{v:.2f}" for v in p) + "</pt>"


def _parse_numbers(kind: str, body: str) -> list[float]:
    parts = body.split()
    bad = [p for p in parts if not _NUMBER.fullmatch(p)]
    if bad:
        raise ValueError(f"<{kind}> holds a non-number {bad[0]!r}: <{kind}>{body}</{kind}>")
    if len(parts) != _WIDTH[kind]:
        raise ValueError(
            f"<{kind}> needs {_WIDTH[kind]} numbers, got {len(parts)}: <{kind}>{body}</{kind}>"
        )
    values = [float(p) for p in parts]
    if not all(np.isfinite(values)):
        raise ValueError(f"<{kind}> holds a non-finite number: <{kind}>{body}</{kind}>")
    if kind == "box" and any(values[i] > values[i + 3] for i in range(3)):
        raise ValueError(f"<box> min exceeds max (order is x0 y0 z0 x1 y1 z1): <box>{body}</box>")
    return values


def parse_locations(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float64 [K,6], points float64 [P,3]) of every placeholder in `text`, in order.

    ValueError (naming the placeholder) on a wrong count of numbers, a non-number, min > max, or
    an unmatched / nested `<box>`/`<pt>` tag.
    """
    boxes, points = [], []
    for m in _PLACEHOLDER.finditer(text):
        if _TAG.search(m.group(2)):
            raise ValueError(f"nested location tags in {m.group(0)!r}")
        values = _parse_numbers(m.group(1), m.group(2))
        (boxes if m.group(1) == "box" else points).append(values)
    stray = _TAG.search(_PLACEHOLDER.sub(" ", text))
    if stray:
        raise ValueError(f"unmatched {stray.group(0)} in {text!r}")
    return np.asarray(boxes, np.float64).reshape(-1, 6), np.asarray(points, np.float64).reshape(
        -1, 3
    )


def content_id(source: str, scene_id: str, task: str, prompt: str, answers: list[str]) -> str:
    """A stable id from the content, so identical records collapse under deduplication."""
    key = json.dumps([scene_id, task, prompt, answers], ensure_ascii=False, default=str)
    return f"{source}-{scene_id}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def make_record(
    scene_id: str,
    task: str,
    prompt: str,
    answers: Iterable[str],
    object_ids: Iterable[int] = (),
    source: str = "template",
    meta: dict | None = None,
    record_id: str | None = None,
) -> dict:
    """A record with the contract fields in order; `id` defaults to `content_id(...)`.

    Values are not coerced (a non-string answer stays one, for `validate_record` to reject).
    """
    if isinstance(answers, str):
        raise ValueError(f"answers must be a list of strings, got the string {answers!r:.60}")
    answers = list(answers)
    return {
        "id": record_id or content_id(source, scene_id, task, prompt, answers),
        "scene_id": scene_id,
        "task": task,
        "prompt": prompt,
        "answers": answers,
        "object_ids": [int(i) for i in object_ids],
        "source": source,
        "meta": dict(meta or {}),
    }


def validate_record(record, known_scenes: set[str] | None = None) -> None:
    """Raises ValueError with the reason when `record` breaks the schema.

    Checks: exactly the contract fields with their types, a known task and source, a non-empty
    prompt, at least one answer and no empty answer, integer object ids, well-formed
    `<box>`/`<pt>` placeholders in prompt and answers, and (when `known_scenes` is given) a
    scene id among them.
    """
    if not isinstance(record, dict):
        raise ValueError(f"record is a {type(record).__name__}, not a JSON object")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"missing fields {missing}")
    extra = sorted(set(record) - set(FIELDS))
    if extra:
        raise ValueError(f"unknown fields {extra} (put extra information in meta)")
    for field in ("id", "scene_id", "prompt"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise ValueError(f"{field} must be a non-empty string, got {record[field]!r}")
    if record["task"] not in TASKS:
        raise ValueError(f"unknown task {record['task']!r} (known: {', '.join(TASKS)})")
    if record["source"] not in SOURCES:
        raise ValueError(f"unknown source {record['source']!r} (known: {', '.join(SOURCES)})")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers:
        raise ValueError("answers must be a non-empty list")
    for a in answers:
        if not isinstance(a, str) or not a.strip():
            raise ValueError(f"empty or non-string answer {a!r}")
    ids = record["object_ids"]
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"object_ids must be a list of integers, got {ids!r}")
    if not isinstance(record["meta"], dict):
        raise ValueError("meta must be a JSON object")
    for where, text in [("prompt", record["prompt"])] + [("answer", a) for a in answers]:
        try:
            parse_locations(text)
        except ValueError as err:
            raise ValueError(f"malformed location in {where}: {err}") from None
    if name_problem(record["scene_id"]):  # it names the scene's files
        raise ValueError(f"scene_id {record['scene_id']!r:.80} {name_problem(record['scene_id'])}")
    if known_scenes is not None and record["scene_id"] not in known_scenes:
        raise ValueError(f"unknown scene {record['scene_id']!r}")


def record_split(record: dict) -> str:
    return record["meta"].get("split", "train")


def read_records(
    path: str | os.PathLike, known_scenes: set[str] | None = None
) -> tuple[list[dict], list[str]]:
    """(valid records, problems) of a JSONL file; each problem is `line N: reason`.

    A missing or unreadable file is an InputError; bad lines are returned as problems so a batch
    job can report them and go on with the rest.
    """
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    records, problems = [], []
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as err:
        raise InputError(path, f"cannot read records ({err.strerror or err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:  # one bad line, not a bad file
            problems.append(f"line {n}: invalid UTF-8 ({err.reason} at byte {err.start})")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"line {n}: not JSON ({err.msg})")
            continue
        try:
            validate_record(record, known_scenes)
        except ValueError as err:
            problems.append(f"line {n}: {err}")
            continue
        records.append(record)
    return records, problems
