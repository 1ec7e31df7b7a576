"""Scenes held out of pretraining: the rooms of the benchmarks' evaluation splits.

3D-LLM is measured on ScanQA and SQA3D validation and test questions about ScanNet rooms, and
the pretraining data (the 3D-LLM release's records, ScanRefer, ...) is written about ScanNet rooms
too. Training on records of an evaluation room lets the model see that room before it is asked
about it, so a pretraining run leaves out every train record whose scene appears in the
evaluation annotation files (`make_train_iterator(hold_out_eval_scenes=True, ...)`,
experiments/configs/pretrain_mixture.py). The list of rooms is read from the annotation files
themselves, never written down here:

- ScanQA: a JSON list of {scene_id, question, ...} (ScanQA_v1.0_val.json,
  ScanQA_v1.0_test_w_obj.json, ScanQA_v1.0_test_wo_obj.json);
- SQA3D: {"questions": [{scene_id, ...}]} or {"annotations": [{scene_id, ...}]}
  (v1_balanced_questions_val_scannetv2.json, ..._test_...), or the release's ScanQA-layout
  SQA_test.json (a list);
- any JSON list, or object with a "questions" / "annotations" list, of entries with `scene_id`.
Entries without a scene_id are passed over; a file with none at all is an error (not an
annotation file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from llm3d_jax.fileio import InputError

# The evaluation files a pretraining run holds out by default, relative to `annotations_dir`.
EVAL_ANNOTATIONS = (
    "ScanQA_v1.0_val.json",
    "ScanQA_v1.0_test_w_obj.json",
    "ScanQA_v1.0_test_wo_obj.json",
    "v1_balanced_questions_val_scannetv2.json",
    "v1_balanced_questions_test_scannetv2.json",
)
_HOW_TO = (
    "set config.data.annotations_dir / held_out_annotations, "
    "or config.data.hold_out_eval_scenes=False to pretrain on every scene"
)


def annotation_paths(annotations_dir: str, names: str | Sequence[str]) -> list[str]:
    """ "a.json,b.json" or a sequence -> paths; relative names are inside `annotations_dir`."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    return [os.path.join(annotations_dir, n) for n in names if n]


def annotation_scenes(path: str) -> set[str]:
    """The scene ids of one annotation file (module doc for the layouts)."""
    if not os.path.isfile(path):
        raise InputError(path, f"held-out annotation file not found ({_HOW_TO})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not a JSON file ({err})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("questions", "annotations") if k in data), None)
    if not isinstance(data, list):
        raise InputError(path, 'expected a JSON list, or a "questions" / "annotations" list')
    scenes = {
        e["scene_id"] for e in data if isinstance(e, dict) and isinstance(e.get("scene_id"), str)
    }
    if not scenes:
        raise InputError(path, "no entry names a scene_id (not a ScanQA / SQA3D annotation file)")
    return scenes


def held_out_scenes(paths: Sequence[str]) -> set[str]:
    """The union of the scene ids of every annotation file."""
    if not paths:
        raise InputError(None, f"hold_out_eval_scenes needs annotation files: {_HOW_TO}")
    scenes: set[str] = set()
    for path in paths:
        scenes |= annotation_scenes(path)
    return scenes


def kept_rows(language, held: set[str]) -> list[int]:
    """Indices of the records of a TFDS language source whose scene is not in `held`."""
    rows = []
    for index in range(len(language)):
        scene_id = language[index]["scene_id"]
        if isinstance(scene_id, bytes):
            scene_id = scene_id.decode("utf-8")
        if scene_id not in held:
            rows.append(index)
    return rows


@dataclass(frozen=True)
class Rows:
    """The records `rows` of a random-access source (len, [i]), renumbered 0..len(rows)-1."""

    source: object
    rows: Sequence[int]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.source[self.rows[index]]

    def answers(self, index: int):
        """The answers of record `index` (the release profile's rows: `pipeline.answer_rows`)."""
        return self.source.answers(self.rows[index])
