r"""Offline language-record throughput and the records produced per task, with same-run references.

    .venv/bin/python tools/bench/language.py [--scenes 100] [--seed 0]

Prints, for `--scenes` synthetic rooms (made in memory first, not timed):
  - offline generator (`offline.generate`, all 8 tasks): records/s and scenes/s, and the time per
    task (which task dominates);
  - references measured in the same run on the same scenes:
      load:      `Scene.load` of the scene files from disk, the cost every scene pays anyway
                 (ratio generate / load);
      write:     `json.dumps` of the records, the cost of writing them (ratio generate / write);
      boxes-demo: the same scenes through the boxes-demo procedure with the offline template
                 LLM (prompt -> reply -> parse -> validate), records/s;
  - records per task and per question type, and the yes/no balance of the QA.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data_pipeline.language import boxes_demo, offline
from data_pipeline.language.openai_client import OfflineChat
from data_pipeline.scenes import Scene
from data_pipeline.scenes.synthetic import make_scene


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    scenes = [make_scene(args.seed, i) for i in range(args.scenes)]
    objects = sum(len(s.objects) for s in scenes)

    per_task = collections.Counter()
    records = []
    start = time.perf_counter()
    for s in scenes:
        for task in offline.TASK_BUILDERS:
            t0 = time.perf_counter()
            records += offline.generate(s, args.seed, (task,))
            per_task[task] += time.perf_counter() - t0
    generate_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        paths = [s.save(tmp) for s in scenes]
        t0 = time.perf_counter()
        for p in paths:
            Scene.load(p)
        load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_s = time.perf_counter() - t0

    chat = OfflineChat(boxes_demo.offline_respond)
    t0 = time.perf_counter()
    demo = [r for s in scenes for r in boxes_demo.records_for_scene(s, chat)[0]]
    demo_s = time.perf_counter() - t0

    n = len(records)
    print(
        f"{args.scenes} synthetic scenes (seed {args.seed}), {objects} objects, {n} offline records, {len(text) / 1e6:.1f} MB JSONL"
    )
    print(
        f"offline generate   {n / generate_s:9.0f} records/s  {args.scenes / generate_s:7.1f} scenes/s  ({generate_s:.2f} s)"
    )
    print(
        f"  ref load         {args.scenes / load_s:9.1f} scenes/s (Scene.load)     generate/load  = {generate_s / load_s:.2f}x the time"
    )
    print(
        f"  ref write        {n / write_s:9.0f} records/s (json.dumps)   generate/write = {generate_s / write_s:.2f}x the time"
    )
    print(
        f"  ref boxes-demo   {len(demo) / demo_s:9.0f} records/s (template LLM, {len(demo)} records before dedupe)"
    )
    print("time per task (s): " + ", ".join(f"{t} {v:.2f}" for t, v in per_task.most_common()))
    counts = collections.Counter(r["task"] for r in records)
    print("records per task:  " + json.dumps(dict(sorted(counts.items()))))
    qtypes = collections.Counter(r["meta"]["qtype"] for r in records if r["task"] == "qa")
    print("qa per type:       " + json.dumps(dict(sorted(qtypes.items()))))
    answers = collections.Counter(r["answers"][0] for r in records if r["task"] == "qa")
    print(
        f"qa answers: yes {answers['yes']}, no {answers['no']}, left {answers['left']}, right {answers['right']}, distinct {len(answers)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
