r"""Renders a scene with ground-truth and predicted boxes to a PNG (matplotlib, headless).

    python tools/visualize.py --scene FEATURES/scene0000_00.npz --out scene.png \
        [--objects 3,7] [--box "x0 y0 z0 x1 y1 z1" ...] \
        [--predictions RUN/eval/predictions.jsonl --id RECORD_ID [--id RECORD_ID ...]]

--scene takes a scene feature file (points coloured by their stored colours, else by the first
three principal components of their features) or a scene file of the data pipeline (the mesh,
faces coloured by their vertices). Two panels: a perspective view and a top-down view.
Ground-truth boxes are drawn green (all of the scene's objects thin, --objects or the record's
object_ids thick), predicted boxes red (--box, or the boxes of --id in a predictions file; with
several --id each answer's boxes carry its number, and the title gives each question's IoU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from llm3d_jax.evaluate.grounding import answer_iou  # noqa: E402
from llm3d_jax.evaluate.picture import load_scene, render  # noqa: E402
from llm3d_jax.fileio import InputError, check_output_file, cli_main  # noqa: E402


def _parse_box(text: str) -> np.ndarray:
    try:
        box = np.array([float(v) for v in text.replace(",", " ").split()], np.float64)
    except ValueError:
        box = np.zeros(0)
    if box.shape != (6,) or not np.all(np.isfinite(box)):
        raise InputError(None, f"--box needs 6 numbers 'x0 y0 z0 x1 y1 z1', got {text!r}")
    return box


def _prediction(path: str, record_id: str) -> dict:
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(path, f"line {n} is not JSON") from None
            if str(row.get("id")) == record_id:
                return row
    raise InputError(path, f"no prediction with id {record_id!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scene", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--objects", default="", help="comma-separated target object ids")
    parser.add_argument("--box", action="append", default=[], help="a predicted box (repeatable)")
    parser.add_argument("--predictions", help="predictions.jsonl of experiments/eval.py")
    parser.add_argument(
        "--id",
        action="append",
        default=[],
        help="record id in --predictions (repeatable: each answer's boxes numbered, with its IoU)",
    )
    args = parser.parse_args(argv)
    check_output_file(args.out)
    scene = load_scene(args.scene)
    try:
        highlight = [int(v) for v in args.objects.split(",") if v.strip()]
    except ValueError:
        raise InputError(
            None, f"--objects must be comma-separated integers, got {args.objects!r}"
        ) from None
    boxes = [_parse_box(b) for b in args.box]
    labels = [""] * len(boxes)
    title = os.path.basename(args.scene)
    if args.predictions:
        if not args.id:
            raise InputError(None, "--predictions needs --id")
        lines = []
        for k, record_id in enumerate(args.id, 1):
            row = _prediction(args.predictions, record_id)
            predicted = [np.asarray(b, np.float64) for b in row.get("boxes", [])]
            boxes += predicted
            highlight += [int(i) for i in row.get("object_ids", [])]
            tag = str(k) if len(args.id) > 1 else ""
            labels += [tag] * len(predicted)
            line = f"{row.get('prompt', '')} -> {row.get('prediction', '')}"[:120]
            iou = answer_iou(row)
            if iou is not None:
                line += f"  (IoU {iou:.2f})"
            lines.append(f"{tag}. {line}" if tag else line)
        title = "\n".join(lines)
    render(scene, args.out, highlight, boxes, title, labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli_main(main)
