"""Importers for the public 3D language datasets into language records.

Formats (docs/reference.md "Public data formats"):
- ScanQA: a JSON list of {scene_id, question_id, question, answers[], object_ids[], object_names[]}
  -> qa records, id `scanqa-<question_id>`, meta {question_id, object_names}. Test-split entries
  without answers are skipped (a record needs an answer).
- SQA3D: a questions file {"questions": [{question, question_id, scene_id, situation, ...}]}
  joined on question_id with an annotations file {"annotations": [{answers: [{answer, ...}],
  question_id, scene_id, position, rotation, answer_type, question_type}]} -> qa records whose
  prompt is "<situation> <question>", meta {question_id, situation, question, position, rotation,
  answer_type, question_type}.
- ScanRefer: a JSON list of {scene_id, object_id (str), object_name, ann_id, description,
  token[]} -> grounding records "Find the object: <description>" -> `<box>` of the object in the
  scene file (so the box is in the scene's aligned frame), meta {object_name, ann_id}.
- 3D-LLM release: a JSON list of {scene_id: int, question, answers[]} plus a map file between the
  integer ids and ScanNet ids (either direction) -> records of `task` (default qa); a question
  holding "Human:"/"Robot:" turns becomes a dialogue record.
- 3DMV-VQA (Hong et al., CVPR 2023; the released 3D-LLM's `questions_only/*_questions.json`): a
  JSON list of {scene_id (an HM3D room, e.g. "00009-vLpv2VX547B_0"), question, answers[], type}
  -> qa records, meta {question_id, type, question_type}: question_id is the entry's own, else
  its position in the list (what the release's scorer numbers it by); id `3dmv_vqa-<question_id>`,
  or `3dmv_vqa-<file stem>-<position>` (unique across the train and test files). Type 0..3 is
  concept, counting, relation, comparison
  (`llm3d_jax.datasets.MV_VQA_QUESTION_TYPES`). The 3D-CLR generator's form is read too: a
  single `answer` (true/false -> "yes"/"no", a number -> its digits) and `family_id` ([k] or k)
  for `type`.
- Objaverse object captions, the release's ChatCaptioner output (3DLanguage_data/ChatCaptioner_based):
  one JSON object per object, {"scene_id": <uid>, "caption_result": {"scene_caption_outside":
  caption, ...}}, in a folder of `<uid>.json` files, one file, or a JSON list of such objects ->
  object_caption records "Describe the 3D scene." -> caption on the object's own scene file
  `<uid>.npz` (one object; `python -m data_pipeline.released --objects`), id `objaverse-<uid>`.

Every importer returns (records, problems); a bad entry is a problem ("entry N: reason") and the
rest are imported.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

from data_pipeline.language.records import format_box, make_record, validate_record
from llm3d_jax.datasets import MV_VQA_QUESTION_TYPES, OBJECT_CAPTION_PROMPT
from llm3d_jax.fileio import InputError


def load_json(path: str | os.PathLike):
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not a JSON file ({err})") from None
    except OSError as err:  # a folder, no permission
        raise InputError(path, f"cannot read ({err.strerror or err})") from None


def _list_of_entries(data, path, key: str | None = None) -> list:
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise InputError(path, f'expected a JSON object with a list "{key}"')
        return data[key]
    if not isinstance(data, list):
        raise InputError(path, "expected a JSON list of entries")
    return data


def _collect(
    entries: list, convert: Callable[[dict, int], dict | None], known_scenes
) -> tuple[list[dict], list[str]]:
    """`convert(entry, position)` -> record (None: skip quietly); bad entries become problems."""
    records, problems = [], []
    for n, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise ValueError("entry is not a JSON object")
            record = convert(entry, n)
            if record is None:
                continue
            validate_record(record, known_scenes)
        except (ValueError, KeyError, TypeError) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            problems.append(f"entry {n}: {reason}")
            continue
        records.append(record)
    return records, problems


def import_scanqa(path, known_scenes: set[str] | None = None):
    entries = _list_of_entries(load_json(path), path)

    def convert(e: dict, n: int) -> dict | None:
        if "answers" not in e:
            raise ValueError(f"question {e.get('question_id')} has no answers (test split?)")
        return make_record(
            e["scene_id"],
            "qa",
            e["question"],
            e["answers"],
            [int(i) for i in e.get("object_ids", [])],
            "scanqa",
            {"question_id": e["question_id"], "object_names": list(e.get("object_names", []))},
            record_id=f"scanqa-{e['question_id']}",
        )

    return _collect(entries, convert, known_scenes)


def import_sqa3d(questions_path, annotations_path, known_scenes: set[str] | None = None):
    questions = _list_of_entries(load_json(questions_path), questions_path, "questions")
    annotations = _list_of_entries(load_json(annotations_path), annotations_path, "annotations")
    by_id = {a["question_id"]: a for a in annotations if isinstance(a, dict) and "question_id" in a}

    def convert(q: dict, n: int) -> dict:
        a = by_id.get(q["question_id"])
        if a is None:
            raise ValueError(f"question {q['question_id']} has no annotation")
        if a.get("scene_id", q["scene_id"]) != q["scene_id"]:
            raise ValueError(
                f"question {q['question_id']}: scene {q['scene_id']} but annotation says {a['scene_id']}"
            )
        answers = list(dict.fromkeys(x["answer"] for x in a["answers"]))
        situation = q.get("situation", "").strip()
        meta = {
            "question_id": q["question_id"],
            "situation": situation,
            "question": q["question"],
            "position": a.get("position"),
            "rotation": a.get("rotation"),
            "answer_type": a.get("answer_type"),
            "question_type": a.get("question_type"),
        }
        prompt = f"{situation} {q['question']}".strip()
        return make_record(
            q["scene_id"], "qa", prompt, answers, [], "sqa3d", meta, f"sqa3d-{q['question_id']}"
        )

    return _collect(questions, convert, known_scenes)


def import_scanrefer(
    path, load_scene: Callable[[str], object], known_scenes: set[str] | None = None
):
    """`load_scene(scene_id)` returns the Scene (raises InputError when it is missing)."""
    entries = _list_of_entries(load_json(path), path)
    cache: dict[str, object] = {}

    def convert(e: dict, n: int) -> dict:
        scene_id = e["scene_id"]
        if known_scenes is not None and scene_id not in known_scenes:
            raise ValueError(f"unknown scene {scene_id!r}")
        if scene_id not in cache:
            try:
                cache[scene_id] = load_scene(scene_id)
            except InputError as err:
                cache[scene_id] = err
        scene = cache[scene_id]
        if isinstance(scene, InputError):
            raise ValueError(f"scene {scene_id}: {scene}")
        object_id = int(e["object_id"])
        box = next((o.box for o in scene.objects if o.id == object_id), None)
        if box is None:
            raise ValueError(f"scene {scene_id} has no object {object_id}")
        description = " ".join(e["description"].split())
        meta = {"object_name": e.get("object_name", ""), "ann_id": str(e.get("ann_id", ""))}
        rid = f"scanrefer-{scene_id}-{object_id}-{e.get('ann_id', '')}"
        return make_record(
            scene_id,
            "grounding",
            f"Find the object: {description}",
            [format_box(box)],
            [object_id],
            "scanrefer",
            meta,
            rid,
        )

    return _collect(entries, convert, known_scenes)


def load_scene_map(path) -> dict[int, str]:
    """integer scene id -> ScanNet id, from a JSON object mapping either way."""
    data = load_json(path)
    if not isinstance(data, dict) or not data:
        raise InputError(path, "scene map must be a non-empty JSON object")
    out = {}
    for k, v in data.items():
        try:
            if isinstance(v, str):
                out[int(k)] = v
            else:
                out[int(v)] = str(k)
        except (TypeError, ValueError):
            raise InputError(path, f"entry {k!r}: {v!r} maps no integer id to a scene id") from None
    return out


def import_3dllm(path, map_path, task: str = "qa", known_scenes: set[str] | None = None):
    entries = _list_of_entries(load_json(path), path)
    scene_map = load_scene_map(map_path)

    def convert(e: dict, n: int) -> dict:
        raw = e["scene_id"]
        try:
            scene_id = scene_map[int(raw)]
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"scene id {raw!r} is not in the map file") from None
        question = e["question"]
        kind = "dialogue" if "Human:" in question or "Robot:" in question else task
        return make_record(
            scene_id, kind, question, e["answers"], [], "3dllm", {"release_scene_id": raw}
        )

    return _collect(entries, convert, known_scenes)


def _mv_vqa_type(e: dict) -> int:
    raw = e["type"] if "type" in e or "family_id" not in e else e["family_id"]
    if isinstance(raw, list) and len(raw) == 1:  # the 3D-CLR generator's family_id: [k]
        raw = raw[0]
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 4:
        raise ValueError(f"type {raw!r} is not one of 0..3 ({', '.join(MV_VQA_QUESTION_TYPES)})")
    return raw


def _mv_vqa_answers(e: dict) -> list:
    if "answers" in e or "answer" not in e:
        return e["answers"]
    answer = e["answer"]
    if isinstance(answer, bool):
        return ["yes" if answer else "no"]
    if isinstance(answer, int):
        return [str(answer)]
    return [answer]


def import_3dmv_vqa(path, known_scenes: set[str] | None = None):
    entries = _list_of_entries(load_json(path), path)
    stem = os.path.splitext(os.path.basename(path))[0]

    def convert(e: dict, n: int) -> dict:
        kind = _mv_vqa_type(e)
        qid = e.get("question_id", n)
        meta = {"question_id": qid, "type": kind, "question_type": MV_VQA_QUESTION_TYPES[kind]}
        rid = f"3dmv_vqa-{qid}" if "question_id" in e else f"3dmv_vqa-{stem}-{n}"
        return make_record(
            e["scene_id"], "qa", e["question"], _mv_vqa_answers(e), [], "3dmv_vqa", meta, rid
        )

    return _collect(entries, convert, known_scenes)


def import_objaverse_captions(path, known_scenes: set[str] | None = None):
    """`path`: a folder of ChatCaptioner `<uid>.json` files (problems then name the file), one
    such file, or a JSON list of such objects."""

    def convert(e: dict, n: int) -> dict:
        result = e["caption_result"]
        if not isinstance(result, dict):
            raise ValueError("caption_result is not a JSON object")
        caption = result["scene_caption_outside"]
        if not isinstance(caption, str):
            raise ValueError(f"scene_caption_outside is not a string: {caption!r:.60}")
        uid = e["scene_id"]
        return make_record(
            uid,
            "object_caption",
            OBJECT_CAPTION_PROMPT,
            [" ".join(caption.split())],
            [],
            "objaverse",
            {"objaverse_uid": uid},
            f"objaverse-{uid}",
        )

    def entries_of(data, where):
        if isinstance(data, dict):
            return [data]
        if isinstance(data, list):
            return data
        raise InputError(where, "expected a ChatCaptioner JSON object or a list of them")

    if not os.path.isdir(path):
        return _collect(entries_of(load_json(path), path), convert, known_scenes)
    files = sorted(glob.glob(os.path.join(path, "*.json")))
    if not files:
        raise InputError(path, "no .json files (ChatCaptioner writes one <uid>.json per object)")
    records, problems = [], []
    for file in files:
        name = os.path.basename(file)
        try:
            got, bad = _collect(entries_of(load_json(file), file), convert, known_scenes)
        except InputError as err:
            problems.append(f"{name}: {err.problem}")
            continue
        records += got
        problems += [f"{name}: {p}" for p in bad]
    return records, problems
