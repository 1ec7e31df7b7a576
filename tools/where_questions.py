r"""'Where is the <colour> <category>?' on rooms no model has seen: questions, then their score.

    python -m tools.where_questions make --features FEATURES --scenes SCENES --out Q.jsonl
    python tools/ask.py --model MODEL --questions Q.jsonl --out A.jsonl
    python -m tools.where_questions score --questions Q.jsonl --answers A.jsonl

`make` writes one question per object whose colour and category together name it alone in its
room (the colour comes from the scene file, the box from the feature file), in ask.py's batch
format plus the reference box: {"id", "scene", "question", "task": "grounding", "box"}. Paths in
"scene" are as given by --features. `score` prints Acc@0.25, Acc@0.5, mIoU and the share of
answers without a box as one JSON object (a question with no answer line counts as no box).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from llm3d_jax.evaluate import grounding_metrics  # noqa: E402
from llm3d_jax.fileio import (  # noqa: E402
    InputError,
    cli_main,
    load_npz,
    write_jsonl_atomic,
)

FEATURE_KEYS = ("object_ids", "object_labels", "object_boxes")


def make_questions(features: str, scenes: str) -> list[dict]:
    """One grounding question per object named alone by its colour and category."""
    questions = []
    for name in sorted(os.listdir(features)):
        if not name.endswith(".npz"):
            continue
        scene_id = name[: -len(".npz")]
        feature_file = os.path.join(features, name)
        data = load_npz(feature_file, required=FEATURE_KEYS)
        scene = load_npz(os.path.join(scenes, name), required=("object_ids", "object_colors"))
        colours = dict(zip(scene["object_ids"].tolist(), scene["object_colors"].tolist()))
        pairs = collections.Counter(
            (colours.get(i, ""), label)
            for i, label in zip(data["object_ids"].tolist(), data["object_labels"].tolist())
        )
        for i, label, box in zip(
            data["object_ids"].tolist(), data["object_labels"].tolist(), data["object_boxes"]
        ):
            colour = colours.get(i, "")
            if colour and pairs[(colour, label)] == 1:
                questions.append(
                    dict(
                        id=f"{scene_id}/{i}",
                        scene=feature_file,
                        question=f"Where is the {colour} {label}?",
                        task="grounding",
                        box=[float(v) for v in box],
                    )
                )
    return questions


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(path, f"line {n} is not JSON") from None
    return rows


def score(questions: list[dict], answers: list[dict]) -> dict:
    by_id = {a.get("id"): a for a in answers}
    gt = np.asarray([q["box"] for q in questions], np.float64).reshape(-1, 6)
    pred = [(by_id.get(q["id"], {}).get("boxes") or [None])[0] for q in questions]
    return {
        **grounding_metrics(pred, gt),
        "without box (%)": 100.0 * sum(p is None for p in pred) / max(len(pred), 1),
        "count": len(questions),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make")
    make.add_argument("--features", required=True, help="feature files of the rooms")
    make.add_argument("--scenes", required=True, help="their scene files (object colours)")
    make.add_argument("--out", required=True)
    check = sub.add_parser("score")
    check.add_argument("--questions", required=True)
    check.add_argument("--answers", required=True)
    args = parser.parse_args(argv)
    if args.command == "make":
        questions = make_questions(args.features, args.scenes)
        if not questions:
            raise InputError(args.features, "no object is named alone by colour and category")
        write_jsonl_atomic(args.out, questions)
        print(f"wrote {len(questions)} questions to {args.out}")
    else:
        print(json.dumps(score(read_jsonl(args.questions), read_jsonl(args.answers))))
    return 0


if __name__ == "__main__":
    cli_main(main)
