r"""Builds the pretrained pieces that `make demo` starts from, on rooms the demo never sees.

3D-LLM does not learn from a few dozen rooms: its ViT comes pretrained (BLIP-2), and the 3D-LLM
itself is pretrained on 300k 3D-language pairs before it is fine-tuned. From random init, the
demo's 48 training rooms are too few to learn what a chair is or what colour it has (README,
"Why the demo starts from pretrained weights"). This script does both pretrainings in small, on
synthetic rooms of *another* seed (default 1000; the demo's rooms use seed 0):

  1. the encoder: tools/train_encoder.py (masked object crops -> category and colour);
  2. the demo's data stages (tools/demo.py: scenes, renders, fusion features with that
     encoder, offline language, tokenizer, TFDS) on --scenes rooms, an eighth held out;
  3. for the 3D-LLM and for the blind model (point features zeroed), the same two phases of
     experiments/train.py with the demo config, each phase evaluated on the held-out rooms:
     a. the whole language mixture from random init (--steps);
     b. from (a), only the questions about objects' attributes (ATTRIBUTE_QUESTIONS, about a
        third of the QA): they are what ties a word to the points of one object, and in the
        mixture they come too rarely for the from-scratch Q-Former to learn it (--attribute-steps);
  4. tools/export.py --safetensors of each (b).

    python -m tools.pretrain_demo --out assets/demo

OUT gets encoder/, pretrained_3d/, pretrained_blind/ (what assets/demo holds) and work/ (data,
runs with their eval/metrics.md; not needed afterwards). Every stage is skipped when its
output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llm3d_jax.fileio import write_text_atomic
from tools import demo, train_encoder

# data_pipeline.language.offline question types that ask what one object (or the room's
# floor / walls) is like: colour, existence, count.
ATTRIBUTE_QUESTIONS = (
    "color",
    "exist",
    "exist_color",
    "count",
    "count_color",
    "floor_color",
    "wall_color",
)


def attribute_records(records: str, out: str) -> int:
    """Writes the QA records of ATTRIBUTE_QUESTIONS from `records` to `out`: -> how many."""
    lines = []
    with open(records, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["task"] == "qa" and record["meta"].get("qtype") in ATTRIBUTE_QUESTIONS:
                lines.append(line)
    if not lines:
        raise SystemExit(f"error: {records}: no QA records of types {ATTRIBUTE_QUESTIONS}")
    write_text_atomic(out, "".join(lines))
    return len(lines)


def export(workdir: str, target: str) -> None:
    demo.run(
        [demo.PY, "tools/export.py", "--workdir", workdir, "--out", target, "--safetensors"],
        os.path.join(target, "model.safetensors"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenes", type=int, default=512, help="rooms for the 3D-LLM")
    parser.add_argument("--encoder-scenes", type=int, default=1536, help="rooms for the ViT")
    parser.add_argument("--encoder-steps", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=12000, help="phase (a): whole mixture")
    parser.add_argument("--attribute-steps", type=int, default=8000, help="phase (b)")
    parser.add_argument("--seed", type=int, default=1000, help="rooms of this seed (demo: 0)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")

    encoder = os.path.join(out, "encoder")
    demo.banner(f"encoder: {args.encoder_scenes} rooms, {args.encoder_steps} steps")
    if os.path.exists(os.path.join(encoder, "model.safetensors")):
        print(f"(done already: {os.path.relpath(encoder)})")
    else:
        train_encoder.main(
            [
                "--out",
                encoder,
                "--scenes",
                str(args.encoder_scenes),
                "--steps",
                str(args.encoder_steps),
                "--seed",
                str(args.seed),
            ]
        )

    data = demo.build_data(work, args.scenes, args.seed, f"vit:{encoder}", val_fraction=0.125)
    attributes = dict(data, records=f"{work}/attributes.jsonl", tfds=f"{work}/tfds_attributes")
    if not os.path.exists(f"{attributes['tfds']}/build_report.synthetic.json"):
        count = attribute_records(data["records"], attributes["records"])
        print(f"{count} attribute questions -> {attributes['records']}")
    demo.build_tfds(data["features"], attributes["records"], attributes["tfds"])

    for mode in ("3d", "blind"):
        blind = mode == "blind"
        demo.banner(f"pretrain {mode}: (a) whole mixture, {args.steps} steps")
        mixture_run = os.path.join(work, f"run_{mode}")
        demo.train_and_eval(mixture_run, data, args.seed, blind, args.steps)
        export(mixture_run, os.path.join(work, f"mixture_{mode}"))
        demo.banner(f"pretrain {mode}: (b) attribute questions, {args.attribute_steps} steps")
        attribute_run = os.path.join(work, f"run_{mode}_attributes")
        demo.train_and_eval(
            attribute_run,
            attributes,
            args.seed,
            blind,
            args.attribute_steps,
            pretrained=os.path.join(work, f"mixture_{mode}"),
        )
        export(attribute_run, os.path.join(out, f"pretrained_{mode}"))
    print(f"-> {os.path.relpath(out)}: encoder/, pretrained_3d/, pretrained_blind/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
