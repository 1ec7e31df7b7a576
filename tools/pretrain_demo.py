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
     b. from (a), only the questions about objects' attributes (demo.ATTRIBUTE_QUESTIONS, about a
        third of the QA): they are what ties a word to the points of one object, and in the
        mixture they come too rarely for the from-scratch Q-Former to learn it (--attribute-steps);
     c. from (b), the whole mixture again, with GROUNDING_SETTINGS (target tokens: the points
        rated as the named object's and the box of the best-rated point's region as six
        location tokens; location rows from the sin/cos table; grown at random init), so the
        model learns *where* (grounding is about a third of the records; --grounding-steps, 0
        skips it); the 3D model also grows ROLE_SETTINGS (object roles and their geometry).
     d. from (c), the relational questions (demo.RELATIONAL: side, between, on, near, bigger,
        taller) with the attribute questions of (b) again (alone, the relational questions cost
        the attribute answers their lead; --relation-steps, 0 skips it), at phase (c)'s rate;
        the 3D model with RELATION_SETTINGS (its role geometry afresh, half the rows shown the
        true boxes of the objects the question names).
  4. tools/export.py --safetensors of each last phase.

    python -m tools.pretrain_demo --out assets/demo
    python -m tools.pretrain_demo --out OUT --from-pretrained assets/demo --scenes 256 \
        --grounding-steps 3000 --relation-steps 0   # phase (c) alone, from an earlier run's models

assets/demo was made by the first command without phase (c) (as it was then), and then by the
second (its pretrained_3d/ and pretrained_blind/ copied in): 256 rooms of seed 1000, 3000 steps
of phase (c) for each model.
Held-out rooms of that run after (c): grounding Acc@0.25 30.1 (3D) vs 2.1 (blind), on 1480
questions (work/run_*_grounding/eval/metrics.md). The same phase (c) with
--config.model.target_context=True (which lifts tools/oracle_grounding.py from 43.0 to 51.0)
gave 16.7: not used, not understood yet. That phase (c) ran with the box rule of the time
(target_threshold 0, REGION_RADIUS 48); the same held-out questions with today's rule on the
same weights: 43.5. Phase (c) rerun with threshold -1: 41.1 at radius 48 (40.7 for assets/demo's),
so assets/demo was not rebuilt then. Its pretrained_3d/ was then made by phase (c) once more, from
itself, with ROLE_SETTINGS added (`--config.model.object_roles=3`: the
points rated as the first, second and third object the prompt names, and the geometry of their
boxes as tokens; docs/architecture.md):

    python -m tools.pretrain_demo --out OUT --from-pretrained assets/demo --scenes 256 \
        --grounding-steps 3000 --relation-steps 0

(the blind model gets the same 3000 steps without roles: its points are zero, so it has nothing
to rate; both models have had phase (c) twice). Measured after make demo's fine-tuning, on make
demo's held-out rooms: the 3D model's grounding Acc@0.25 48.9 (40.0 before), QA EM 60.9 (57.8),
relational QA EM 51.5 (48.8). Last, phase (d) alone, from those models (both of them; assets/demo
as of commit 94013f5):

    python -m tools.pretrain_demo --out OUT --from-pretrained assets/demo --scenes 256 \
        --grounding-steps 0 --relation-steps 5000

(the 3D model with RELATION_SETTINGS; both at GROUNDING_LR; ~17 min per model on 2 cores; the
runs that made assets/demo were experiments/train.py with exactly the arguments this passes).
Held-out rooms of phase (d) (1719 questions, work/run_*_relations/eval), relational / attribute
EM: 69.0 / 85.0 (3D; side 82.5, between_yn 96.5, colour 71.0) vs 55.7 / 56.1 (blind). The
relational questions alone (3000 steps) gave 74.1 relational EM, but after make demo's
fine-tuning object colour was level with the blind model (11.8); docs/architecture.md has the
details and make demo's numbers.
README has the table with both models.

OUT gets encoder/, pretrained_3d/, pretrained_blind/ (what assets/demo holds) and work/ (data,
runs with their eval/metrics.md; not needed afterwards). Every stage is skipped when its
output exists, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from llm3d_jax.fileio import write_text_atomic
from tools import demo, train_encoder

# Phase (c): what the model grows for grounding, and a higher peak rate than the demo's
# fine-tuning for those new params (same warm-up and cosine decay).
GROUNDING_SETTINGS = (
    "--config.model.target_tokens=32",
    "--config.model.target_layers=1",
    "--config.model.loc_table_dim=21",
)
# and for the 3D model only: the blind model's points are all zero, so no role has a box
ROLE_SETTINGS = ("--config.model.object_roles=3",)
GROUNDING_LR = 5e-4
# Phase (d), the 3D model: its role geometry starts afresh (after phase (c), where the roles
# after the first were seldom found, the LLM had learnt to pass it by: from there, 2000
# relational steps left between_yn and side at chance), and half the rows show the true boxes
# of the named objects (the LLM learns to read them while the role ratings still miss).
RELATION_SETTINGS = ('--config.model.reinit=("role_geometry/.*",)', "--config.role_teacher=0.5")


def qa_records(records: str, out: str, qtypes: tuple[str, ...]) -> int:
    """Writes the QA records of `qtypes` from `records` to `out`: -> how many."""
    lines = []
    with open(records, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["task"] == "qa" and record["meta"].get("qtype") in qtypes:
                lines.append(line)
    if not lines:
        raise SystemExit(f"error: {records}: no QA records of types {qtypes}")
    write_text_atomic(out, "".join(lines))
    return len(lines)


def question_data(data: dict, work: str, name: str, qtypes: tuple[str, ...]) -> dict:
    """`data` with only the QA records of `qtypes` (work/<name>.jsonl, work/tfds_<name>)."""
    part = dict(data, records=f"{work}/{name}.jsonl", tfds=f"{work}/tfds_{name}")
    if not os.path.exists(f"{part['tfds']}/build_report.synthetic.json"):
        count = qa_records(data["records"], part["records"], qtypes)
        print(f"{count} {name} questions -> {part['records']}")
    demo.build_tfds(data["features"], part["records"], part["tfds"])
    return part


def export(workdir: str, target: str) -> None:
    demo.run(
        [demo.PY, "tools/export.py", "--workdir", workdir, "--out", target, "--safetensors"],
        os.path.join(target, "model.safetensors"),
    )


def phase_c(work: str, data: dict, args, mode: str, start: str) -> str:
    """Phase (c) of `mode` from the exported model `start` -> the exported model."""
    demo.banner(f"pretrain {mode}: (c) whole mixture with grounding, {args.grounding_steps} steps")
    run = os.path.join(work, f"run_{mode}_grounding")
    roles = ROLE_SETTINGS if mode == "3d" else ()
    extra = (*GROUNDING_SETTINGS, *roles, f"--config.optim.lr={GROUNDING_LR}")
    demo.train_and_eval(
        run, data, args.seed, mode == "blind", args.grounding_steps, pretrained=start, extra=extra
    )
    exported = os.path.join(work, f"grounding_{mode}")
    export(run, exported)
    return exported


def phase_d(work: str, relations: dict, args, mode: str, start: str) -> str:
    """Phase (d) of `mode` from the exported model `start` -> the exported model."""
    demo.banner(
        f"pretrain {mode}: (d) relational and attribute questions, {args.relation_steps} steps"
    )
    run = os.path.join(work, f"run_{mode}_relations")
    extra = (*(RELATION_SETTINGS if mode == "3d" else ()), f"--config.optim.lr={GROUNDING_LR}")
    demo.train_and_eval(
        run,
        relations,
        args.seed,
        mode == "blind",
        args.relation_steps,
        pretrained=start,
        extra=extra,
    )
    exported = os.path.join(work, f"relations_{mode}")
    export(run, exported)
    return exported


def install(exported: str, out: str, mode: str) -> None:
    """exported -> OUT/pretrained_<mode>. OUT may be the folder the phases started from: the
    model is replaced only once they are done."""
    target = os.path.join(out, f"pretrained_{mode}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(exported, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenes", type=int, default=512, help="rooms for the 3D-LLM")
    parser.add_argument("--encoder-scenes", type=int, default=1536, help="rooms for the ViT")
    parser.add_argument("--encoder-steps", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=12000, help="phase (a): whole mixture")
    parser.add_argument("--attribute-steps", type=int, default=8000, help="phase (b)")
    parser.add_argument(
        "--relation-steps", type=int, default=5000, help="phase (d); 0: none (module doc)"
    )
    parser.add_argument(
        "--grounding-steps", type=int, default=3000, help="phase (c); 0: none (module doc)"
    )
    parser.add_argument(
        "--from-pretrained",
        help="a folder with pretrained_3d/ and pretrained_blind/ to run phase (c) from, "
        "instead of the encoder stage and phases (a) and (b); its encoder/ encodes the rooms",
    )
    parser.add_argument("--seed", type=int, default=1000, help="rooms of this seed (demo: 0)")
    parser.add_argument(
        "--modes",
        default="3d,blind",
        help="which models to train: 3d, blind or both (a grounding try needs only 3d)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"3d", "blind"}:
        raise SystemExit(f"error: --modes {args.modes!r}: give 3d, blind or 3d,blind")
    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")

    encoder = os.path.join(out, "encoder")
    start = args.from_pretrained and os.path.abspath(args.from_pretrained)
    if start and not (args.grounding_steps or args.relation_steps):
        raise SystemExit(
            "error: --from-pretrained runs phases (c) and (d) only: give --grounding-steps N "
            "or --relation-steps N"
        )
    if start:
        encoder = os.path.join(start, "encoder")
        print(f"phases (c), (d) from {os.path.relpath(start)}/pretrained_{{3d,blind}}")
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

    # Phase (c) alone keeps the pretrained models' tokenizer; a full run trains its own.
    tokenizer = os.path.join(start, "pretrained_3d") if start else None
    data = demo.build_data(
        work, args.scenes, args.seed, f"vit:{encoder}", val_fraction=0.125, tokenizer=tokenizer
    )
    attributes = question_data(data, work, "attributes", demo.ATTRIBUTE_QUESTIONS)
    # (named apart from the relational-only data of before, which a resumed OUT may hold)
    relations = question_data(
        data, work, "relations_attributes", (*demo.RELATIONAL, *demo.ATTRIBUTE_QUESTIONS)
    )

    def grounding_phases(mode: str, model: str) -> None:
        if args.grounding_steps:
            model = phase_c(work, data, args, mode, model)
        if args.relation_steps:
            model = phase_d(work, relations, args, mode, model)
        install(model, out, mode)

    for mode in modes:
        blind = mode == "blind"
        if start:
            grounding_phases(mode, os.path.join(start, f"pretrained_{mode}"))
            continue
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
        if args.grounding_steps or args.relation_steps:
            export(attribute_run, os.path.join(work, f"attributes_{mode}"))
            grounding_phases(mode, os.path.join(work, f"attributes_{mode}"))
        else:
            export(attribute_run, os.path.join(out, f"pretrained_{mode}"))
    print(f"-> {os.path.relpath(out)}: encoder/, " + ", ".join(f"pretrained_{m}/" for m in modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
