"""Counts of a record set (per task, source, split, question type) and an answer-length histogram."""

from __future__ import annotations

import collections
import io
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from data_pipeline.language.records import TASKS, record_split
from llm3d_jax.fileio import write_bytes_atomic, write_jsonl_atomic, write_text_atomic, writing

LENGTH_BINS = (1, 2, 3, 4, 6, 9, 13, 20, 30, 50, 100)  # answer length in words: [1,2), [2,3) ...


def answer_words(answer: str) -> int:
    """Words of an answer; a `<box>`/`<pt>` placeholder counts as one word."""
    return len(re.sub(r"<(box|pt)>.*?</\1>", "LOC", answer).split())


def summarize(records: Sequence[dict]) -> dict:
    """JSON-ready counts: records, scenes, per task/source/split/task:source/qtype, answer lengths."""
    lengths = [answer_words(a) for r in records for a in r["answers"]]
    edges = list(LENGTH_BINS) + [max(lengths + [LENGTH_BINS[-1]]) + 1]
    hist, _ = (
        np.histogram(lengths, bins=edges) if lengths else (np.zeros(len(edges) - 1, int), None)
    )
    per_task_words = collections.defaultdict(list)
    for r in records:
        per_task_words[r["task"]] += [answer_words(a) for a in r["answers"]]
    return {
        "records": len(records),
        "scenes": len({r["scene_id"] for r in records}),
        "per_task": dict(sorted(collections.Counter(r["task"] for r in records).items())),
        "per_source": dict(sorted(collections.Counter(r["source"] for r in records).items())),
        "per_split": dict(sorted(collections.Counter(record_split(r) for r in records).items())),
        "per_task_source": dict(
            sorted(collections.Counter(f"{r['task']}:{r['source']}" for r in records).items())
        ),
        "per_qtype": dict(
            sorted(
                collections.Counter(
                    r["meta"].get("qtype", "") for r in records if r["meta"].get("qtype")
                ).items()
            )
        ),
        "answer_words": {
            "mean": float(np.mean(lengths)) if lengths else 0.0,
            "max": int(max(lengths)) if lengths else 0,
            "bins": [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])],
            "counts": [int(c) for c in hist],
            "mean_per_task": {t: float(np.mean(v)) for t, v in sorted(per_task_words.items())},
        },
    }


def histogram_png(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Answer length (words, log-scaled bins) per task as stacked bars, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = {
        t: [answer_words(a) for r in records if r["task"] == t for a in r["answers"]] for t in TASKS
    }
    top = max([x for v in lengths.values() for x in v] + [LENGTH_BINS[-1]]) + 1
    edges = list(LENGTH_BINS) + [top]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    bottom = np.zeros(len(edges) - 1)
    labels = [
        f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])
    ]
    labels.append(f"{edges[-2]}+")
    for task in TASKS:
        if not lengths[task]:
            continue
        counts, _ = np.histogram(lengths[task], bins=edges)
        ax.bar(labels, counts, bottom=bottom, label=f"{task} ({len(lengths[task])})")
        bottom += counts
    ax.set_xlabel("answer length (words; a <box>/<pt> counts as one)")
    ax.set_ylabel("answers")
    ax.set_title(f"{len(records)} records, {len({r['scene_id'] for r in records})} scenes")
    if records:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def write_report(
    records: Sequence[dict], records_path, stats_path, png_path, extra: dict | None = None
) -> dict:
    """Writes the records (JSONL), their stats and the length histogram: all three or none.

    A full disk or a file-size limit part-way is an InputError naming the file that could not
    be written, and the files already written by this call are removed (no partial output).
    """
    stats = {**summarize(records), **(extra or {})}
    steps = (
        (records_path, lambda: write_jsonl_atomic(records_path, records)),
        (stats_path, lambda: write_text_atomic(stats_path, json.dumps(stats, indent=1) + "\n")),
        (png_path, lambda: histogram_png(records, png_path)),
    )
    written = []
    try:
        for path, write in steps:
            with writing(path):
                write()
            written.append(path)
    except BaseException:
        for path in written:
            os.remove(path)
        raise
    return stats
