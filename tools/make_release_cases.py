"""Writes tests/fixtures/release/cases.json: what the released 3D-LLM (LAVIS, PyTorch) feeds and
trains on, computed with its own formulas, for tests/data/test_release_profile.py and
tests/train/test_release_training.py to hold the `release` profile to.

Run with the separate torch venv (torch is never a dependency of llm3d_jax; only the point rows
need it, for `torch.randperm` exactly as the release calls it):
    /work/torchvenv/bin/python tools/make_release_cases.py [--out tests/fixtures/release/cases.json]

The formulas, restated from UMass-Foundation-Model/3D-LLM, 3DLLM_BLIP2-base/lavis/ (this file
never imports llm3d_jax's versions of them):
  question  processors/blip_processors.py BlipQuestionProcessor.pre_question: lower(), delete
            `.!"()*#:;~`, rstrip(" "), keep the first max_words (50) " "-separated words.
  points    datasets/datasets/threedvqa_datasets.py: N > 5000: rows
            `torch.sort(torch.randperm(N)[:5000])[1]` (the sort indices); else all N rows, then
            5000 - N zero rows (written -1 here); the Q-Former's point mask is all ones.
  answers   the same file: `answer_weight` dict in first-seen order -> one row per key
            (datasets/vqa_datasets.py collater + models/blip2_models/blip2_t5.py forward repeat
            the question once per answer).
  schedule  common/optims.py LinearWarmupCosineLRScheduler, stepped by tasks/base_task.py
            before each iteration i of epoch e: e == 0: min(init, warmup + (init - warmup) * i /
            max(warmup_steps, 1)); else min + (init - min) * 0.5 * (1 + cos(pi * e / max_epoch)).

Contents:
  records    the fixture scenes' language records (tests/data_pipeline/test_tfds_fixtures.py
             scenes, ScanQA-style questions and answers, some repeated) with `release_prompt`
             and `release_answers` (the distinct answers, one training row each)
  questions  [{question, release}] edge cases of the processor (and the ScanQA test fixture)
  points     [{scene_id, n, num_points, seed, rows}] per fixture scene (num_points 48) and one
             scene of the release's size (12000 points -> 5000)
  answers    [{answers, rows}]
  schedules  [{params, steps, lr}] the release's ScanQA values (16 GPUs x 2 questions: 799
             iterations per epoch, so the warm-up is cut short at 80% of 1e-4; 8 GPUs: 1598)
             and a run resumed at epoch 3 (LAVIS resumes at a checkpoint's epoch + 1: no warm-up)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the fixture module writes its files with llm3d_jax.fileio
FIXTURE_POINTS = 48  # tests/data/test_release_profile.py SHAPES["num_points"]

# What LAVIS's processor must get right: case, each deleted character, "?" and "," kept, inner
# runs of spaces and tabs kept, leading spaces kept, trailing spaces dropped, a newline kept,
# more than 50 words. (Our location placeholders are left out: the release's data never has
# them, and the profile keeps them whole where LAVIS would delete their dots.)
EDGE_QUESTIONS = [
    "What color is the chair next to the table?",
    "Where is the LAMP placed?",
    'Is there a "big" (wooden) table; next to: the bed~ #2*!',
    "What is on the left of the 2.5 m long sofa?",
    "how many  chairs are   around the table ?",
    "  where is the tv?   ",
    "What is\tbehind the door?\n",
    "What is the object.   ",
    "Where is the pillow, on the bed or on the sofa?",
    " ".join(f"word{i}." for i in range(60)),
    "word " * 49 + "end  and  more",
    "",
]
ANSWER_LISTS = [
    ["brown wooden chair", "brown chair"],
    ["on table"],
    ["2", "2", "two"],
    ["white", "White", "white"],
    ["a", "b", "a", "c", "b"],
    ["under the window", "under the window"],
]
SCANQA = os.path.join(REPO, "tests", "fixtures", "language", "scanqa_val.json")


def pre_question(question: str, max_words: int = 50) -> str:
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def release_rows(n: int, num_points: int, seed: int) -> list[int]:
    torch.manual_seed(seed)
    if n > num_points:
        return torch.sort(torch.randperm(n)[:num_points])[1].tolist()
    return list(range(n)) + [-1] * (num_points - n)


def distinct(answers: list[str]) -> list[str]:
    weight = {}
    for answer in answers:
        weight[answer] = weight.get(answer, 0) + 1 / len(answers)
    return list(weight.keys())


def lavis_lr(step: int, p: dict) -> float:
    """Global step (0 = the first update) -> the lr LAVIS sets before that update."""
    epoch = p["first_epoch"] + step // p["steps_per_epoch"]
    i = step % p["steps_per_epoch"]
    if epoch == 0:
        warm = p["warmup_lr"] + (p["lr"] - p["warmup_lr"]) * i / max(p["warmup_steps"], 1)
        return min(p["lr"], warm)
    cos = 0.5 * (1.0 + math.cos(math.pi * epoch / p["max_epoch"]))
    return (p["lr"] - p["min_lr"]) * cos + p["min_lr"]


def fixture_rows() -> list[dict]:
    path = os.path.join(REPO, "tests", "data_pipeline", "test_tfds_fixtures.py")
    spec = importlib.util.spec_from_file_location("test_tfds_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as root:
        _, _, scenes, rows = module.write_fixture(root)
    return scenes, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/release/cases.json"))
    args = parser.parse_args()

    with open(SCANQA) as f:
        scanqa = json.load(f)
    questions = [q["question"] for q in scanqa] + EDGE_QUESTIONS
    scenes, rows = fixture_rows()
    records = []
    for j, row in enumerate(rows):
        question = questions[j % len(questions)] or "what is this?"  # a record needs a prompt
        answers = ANSWER_LISTS[j % len(ANSWER_LISTS)]
        records.append(
            {
                **row,
                "task": "qa",
                "source": "scanqa",
                "prompt": question,
                "answers": answers,
                "release_prompt": pre_question(question),
                "release_answers": distinct(answers),
            }
        )
    points = [
        {
            "scene_id": scene_id,
            "n": len(scene["features"]),
            "num_points": FIXTURE_POINTS,
            "seed": seed,
            "rows": release_rows(len(scene["features"]), FIXTURE_POINTS, seed),
        }
        for scene_id, scene in sorted(scenes.items())
        for seed in (0, 1)
    ]
    points.append(
        {
            "scene_id": "",
            "n": 12000,
            "num_points": 5000,
            "seed": 0,
            "rows": release_rows(12000, 5000, 0),
        }
    )
    release = dict(
        lr=1e-4,
        min_lr=1e-5,
        warmup_lr=1e-8,
        warmup_steps=1000,
        max_epoch=100,
        steps_per_epoch=799,
        first_epoch=0,
    )
    steps = [0, 1, 2, 500, 798, 799, 800, 999, 1000, 1597, 1598, 5000, 39950, 79100, 79899]
    # LAVIS runs epochs first_epoch..max_epoch-1: steps beyond that are never taken.
    resumed = {**release, "first_epoch": 3, "steps_per_epoch": 50}
    schedules = [
        {"params": p, "steps": s, "lr": [lavis_lr(t, p) for t in s]}
        for p, s in (
            (release, steps),
            ({**release, "steps_per_epoch": 1598}, steps[:-3] + [79100, 159799]),
            (resumed, [0, 1, 49, 50, 51, 2000, 4849]),
        )
    ]
    cases = {
        "records": records,
        "questions": [{"question": q, "release": pre_question(q)} for q in questions],
        "points": points,
        "answers": [{"answers": a, "rows": distinct(a)} for a in ANSWER_LISTS],
        "schedules": schedules,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    # One list item per line (the 5000 rows of the big scene stay one line).
    body = ",\n".join(
        f"{json.dumps(key)}: [\n" + ",\n".join(json.dumps(item) for item in items) + "\n]"
        for key, items in cases.items()
    )
    with open(args.out, "w") as f:
        f.write("{\n" + body + "\n}\n")
    print(f"{args.out}: {len(records)} records, {len(questions)} questions, {len(points)} scenes")


if __name__ == "__main__":
    main()
