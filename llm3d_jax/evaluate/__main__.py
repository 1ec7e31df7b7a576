"""`python -m llm3d_jax.evaluate`: scores a QA predictions file, the release's way or ours.

Prints one JSON object (`llm3d_jax.evaluate.qa_scoring.score`); a bad input file is one line on
stderr and exit status 1. See `llm3d_jax.evaluate.qa_scoring` for the formats and formulas.
"""

from __future__ import annotations

import argparse
import json

from llm3d_jax.evaluate import qa_scoring
from llm3d_jax.fileio import InputError, cli_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m llm3d_jax.evaluate",
        description=qa_scoring.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, choices=qa_scoring.TASKS)
    parser.add_argument("--annotations", required=True, help="the benchmark's JSON list")
    parser.add_argument(
        "--predictions",
        required=True,
        nargs="+",
        help="predictions.jsonl, or release result file(s) (JSON lists of question_id, answer)",
    )
    parser.add_argument("--scoring", choices=qa_scoring.SCORINGS, default="release")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    annotations = qa_scoring.load_annotations(args.annotations, args.task)
    predictions, kind = qa_scoring.load_predictions(args.predictions, annotations)
    try:
        out = qa_scoring.score(args.task, args.scoring, annotations, predictions)
    except RuntimeError as err:  # no Java for pycocoevalcap
        raise InputError(None, str(err)) from None
    print(json.dumps({"predictions_format": kind, **out}, indent=2))
    return 0


if __name__ == "__main__":
    cli_main(main)
