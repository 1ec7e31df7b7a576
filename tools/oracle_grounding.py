r"""Grounding on oracle point features: does a model change teach "where", minutes per try?

Real point features (a ViT on renders, lifted to 3D) are noisy; when grounding does not learn,
this tells whether the model could learn it from perfect features. Every point of a synthetic
room gets a one-hot of its object's category and colour (floor and wall have their own entries),
the records are the offline generator's grounding questions, and the answer is the six location
tokens of the box. One process, no files but the two data sets:

    python -m tools.oracle_grounding data --rooms 400 --seed 1000 --out ORACLE/train
    python -m tools.oracle_grounding data --rooms 40 --seed 2000 --out ORACLE/test
    python -m tools.oracle_grounding train --data ORACLE --steps 1200 \
        --set loc_table_dim=21 --set target_tokens=32 --set target_layers=1

`--set` overrides LLM3DConfig.demo fields (integers). Every 600 steps and at the end it prints
held-out Acc@0.25 / Acc@0.5 of greedy answers under the location grammar on `--test-questions`
(400) test questions (`answer`) and, with target tokens, of the box of every point the model
rates as the named object's (`rated`) and of the best-rated point's region (`region`: the box
the LLM is shown, so the answers' ceiling if it copies it).

With `data --relations` the records also hold the offline generator's relational QA questions
(tools/demo.py's group: on, near, side, between, bigger, taller; word answers) and each report
adds their exact match; `train --blind` zeroes every point's features and voxel, the baseline
without 3D input; `--boxes-in-prompt` ends each relational prompt with the true boxes of the
objects it names (can the LLM relate boxes it is given?). Measured (`data --relations`, 400 / 60
rooms, `--test-questions 800`, relations EM): with the target tokens (`--set target_tokens=32
--set target_layers=1 --set loc_table_dim=21`) 40.9 at 1800 steps, 46.3 at 3600; blind 39.7 /
47.5; blind with the boxes in the prompt 44.6 at 1800, 48.8 at 4200 (taller 61.9, side 45.8):
near the answer priors in every case.

The same rooms with the lifted features of the real pipeline instead of the one-hots (same
points, questions and boxes), to tell whether the features or the model stop grounding:

    python -m tools.oracle_grounding data --rooms 400 --seed 1000 --out LIFTED/train \
        --features FEATURES   # python -m data_pipeline.features on rooms of seed 1000

Measured (2-core CPU, shared; 160 training rooms as above but `--rooms 160`; held-out answers'
Acc@0.25): table rows alone 3.5 at 1200 steps (400 rooms); target tokens without the extent
slot vectors 11.5 (rated box 46.5), with them 44.5 (rated box 47.0); on the lifted features of
the same rooms, with the region box shown, 43.0 (rated box 32.8, region box 49.5; relations
1.7), and with the prompt's words read in context (`--set target_context=1`) 51.0 (region box
54.2; relations 16.7).
docs/architecture.md, "Location tokens in the model", says what each finding changed. What the
extent rule itself costs, with the named object's points rated perfectly (`llm3d.REGION_RADIUS`
comes from it):

    python -m tools.oracle_grounding extents --data ORACLE
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from data_pipeline.language import offline  # noqa: E402
from data_pipeline.lift.voxelize import balanced_sample, grid_for_bounds, voxel_indices  # noqa: E402
from data_pipeline.scenes import synthetic  # noqa: E402
from llm3d_jax import tokens  # noqa: E402
from llm3d_jax.data.preprocess import named_order  # noqa: E402
from llm3d_jax.evaluate.grounding import box_iou  # noqa: E402
from llm3d_jax.fileio import InputError, load_npz  # noqa: E402
from llm3d_jax.infer.decode import DecodeConfig  # noqa: E402
from llm3d_jax.infer.generate import generate  # noqa: E402
from llm3d_jax.model import llm3d  # noqa: E402
from llm3d_jax.train.step import rating_loss_sums  # noqa: E402

CATEGORIES = sorted(synthetic.CATEGORIES)
COLOURS = list(synthetic.COLORS)
WIDTH = len(CATEGORIES) + 2 + len(COLOURS)  # categories, floor, wall, colours
STORED, SAMPLED = 1024, 256  # points kept per room (balanced over objects), points per example
PROMPT_LEN, ANSWER_LEN, LOC_OFFSET, EOS, PAD = 24, 7, 512, 1, 0
# The QA question types about relations between objects (tools/demo.py's group)
RELATIONAL = ("between", "between_yn", "near", "on", "on_yn", "bigger", "taller", "side")


def room_points(scene, rng):
    """-> voxels [STORED,3], instance [STORED], oracle features [STORED,WIDTH], grid (origin, voxel):
    points sampled on the mesh surface, one per voxel, in raster order, balanced over objects."""
    tri = scene.vertices[scene.faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    face = rng.choice(len(scene.faces), 20000, p=area / area.sum())
    a, b = rng.random((2, len(face), 1))
    a, b = np.where(a + b > 1, 1 - a, a), np.where(a + b > 1, 1 - b, b)
    t = tri[face]
    points = t[:, 0] + a * (t[:, 1] - t[:, 0]) + b * (t[:, 2] - t[:, 0])
    instance = scene.instance[scene.faces[face, 0]]
    origin, voxel = grid_for_bounds(scene.vertices.min(0), scene.vertices.max(0))
    voxels = np.clip(voxel_indices(points, origin, voxel), 0, 255)
    _, first = np.unique(
        (voxels[:, 0] * 256 + voxels[:, 1]) * 256 + voxels[:, 2], return_index=True
    )
    keep = first[balanced_sample(instance[first], STORED, rng)]
    objects = {o.id: o for o in scene.objects}
    features = np.zeros((len(keep), WIDTH), np.float32)
    for row, (k, z) in enumerate(zip(instance[keep], points[keep, 2])):
        if k >= 0:
            features[row, CATEGORIES.index(objects[int(k)].label)] = 1
            features[row, len(CATEGORIES) + 2 + COLOURS.index(objects[int(k)].color)] = 1
        else:
            features[row, len(CATEGORIES) + (0 if z < 0.02 else 1)] = 1
    return voxels[keep].astype(np.uint8), instance[keep].astype(np.int32), features, (origin, voxel)


def lifted_points(path: str, rng):
    """-> voxels [STORED,3], instance [STORED], features [STORED,D], grid (origin, voxel) of one
    room's feature file (python -m data_pipeline.features): STORED points balanced over objects
    as `room_points` chooses them (a room with fewer has some twice), so only the features
    differ from the oracle's."""
    arrays = load_npz(
        path, required=("features", "voxels", "instance", "grid_origin", "grid_voxel")
    )
    instance = arrays["instance"]
    if not len(instance):
        raise InputError(path, "no points")
    if len(instance) >= STORED:
        keep = balanced_sample(instance, STORED, rng)
    else:  # a small room: every point, some twice (a repeat moves no box)
        keep = np.sort(
            np.concatenate(
                [np.arange(len(instance)), rng.choice(len(instance), STORED - len(instance))]
            )
        )
    grid = (np.asarray(arrays["grid_origin"], np.float64), float(arrays["grid_voxel"]))
    voxels = arrays["voxels"][keep].astype(np.uint8)
    return (
        voxels,
        instance[keep].astype(np.int32),
        arrays["features"][keep].astype(np.float32),
        grid,
    )


def make_data(
    rooms: int, seed: int, out: str, features_dir: str | None = None, relations: bool = False
) -> None:
    rng = np.random.default_rng(seed)
    arrays, records = {"features": [], "voxels": [], "instance": []}, []
    for index in range(rooms):
        scene = synthetic.make_scene(seed, index)
        if features_dir:
            path = os.path.join(features_dir, f"synth_{index:04d}.npz")
            voxels, instance, features, (origin, voxel) = lifted_points(path, rng)
        else:
            voxels, instance, features, (origin, voxel) = room_points(scene, rng)
        arrays["features"].append(features)
        arrays["voxels"].append(voxels)
        arrays["instance"].append(instance)
        tasks = ("grounding", "qa") if relations else ("grounding",)
        for r in offline.generate(scene, seed=seed, tasks=tasks):
            qtype = r["meta"]["qtype"]
            record = dict(room=index, prompt=r["prompt"], ids=r["object_ids"], qtype=qtype)
            if r["task"] == "qa":
                if qtype not in RELATIONAL:
                    continue
                record["answer"] = r["answers"][0]
            else:
                box = tokens.metres_to_voxels(tokens.parse_boxes(r["answers"][0])[0], origin, voxel)
                record["box"] = box.tolist()
            records.append(record)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out + ".npz", **{k: np.stack(v) for k, v in arrays.items()})
    with open(out + ".jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    kind = f"lifted features of {features_dir}" if features_dir else "oracle features"
    width = arrays["features"][0].shape[1]
    qa = sum("answer" in r for r in records)
    print(
        f"{out}: {rooms} rooms, {len(records) - qa} grounding and {qa} relational questions, "
        f"{width}-d {kind}"
    )


class Words:
    """Word-level prompt and answer ids (2..511): enough text for 'where is the red chair?'."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, length: int = PROMPT_LEN) -> list[int]:
        out = [
            self.ids.setdefault(w, 2 + len(self.ids)) for w in re.findall(r"[a-z]+", text.lower())
        ]
        if len(self.ids) > LOC_OFFSET - 2:
            raise SystemExit("error: more than 510 distinct words in the prompts")
        return out[: length - 1] + [EOS]


def answer_ids(record, words) -> list[int]:
    """-> the answer's ids, EOS-ended and PAD-padded to ANSWER_LEN: six location tokens for a
    grounding record, words for a relational question."""
    if "box" in record:
        return [LOC_OFFSET + v for v in record["box"]] + [EOS]
    ids = words(record["answer"], ANSWER_LEN)
    return ids + [PAD] * (ANSWER_LEN - len(ids))


def batch(data, records, words, rng, blind: bool = False, boxes: bool = False):
    """-> model inputs of `records` (SAMPLED random points of each room) and point_target;
    `blind`: every point's features and voxel zero (the same scene for every room); `boxes`: a
    relational question's prompt ends with the six location tokens of each object it names, in
    the record's order (the box of the object's stored points), for PROMPT_LEN + 20 tokens."""
    prompt_len = PROMPT_LEN + 20 if boxes else PROMPT_LEN
    rows = {k: [] for k in ("features", "voxels", "point_target", "prompt_ids", "answer_ids")}
    for r in records:
        keep = np.sort(rng.choice(STORED, SAMPLED, replace=False))
        rows["features"].append(data["features"][r["room"]][keep])
        rows["voxels"].append(data["voxels"][r["room"]][keep])
        rows["point_target"].append(named_order(data["instance"][r["room"]][keep], r["ids"]))
        prompt = words(r["prompt"])
        if boxes and "answer" in r:
            room = data["voxels"][r["room"]].astype(int)
            extra = []
            for i in r["ids"]:
                points = room[data["instance"][r["room"]] == i]
                extra += [LOC_OFFSET + int(v) for v in (*points.min(0), *points.max(0))]
            prompt = prompt[:-1][: prompt_len - 1 - len(extra)] + extra + [EOS]
        rows["prompt_ids"].append(prompt + [PAD] * (prompt_len - len(prompt)))
        rows["answer_ids"].append(answer_ids(r, words))
    out = {k: np.asarray(v) for k, v in rows.items()}
    if blind:
        out["features"], out["voxels"] = 0 * out["features"], 0 * out["voxels"]
    out["voxels"] = out["voxels"].astype(np.int32)
    out["prompt_ids"] = out["prompt_ids"].astype(np.int32)
    out["answer_ids"] = out["answer_ids"].astype(np.int32)
    out["point_mask"] = np.ones(out["point_target"].shape, bool)
    out["prompt_mask"] = out["prompt_ids"] != PAD
    # the EOS and what comes before it
    out["answer_mask"] = (
        np.cumsum(out["answer_ids"] == EOS, axis=1) - (out["answer_ids"] == EOS) == 0
    )
    return out


def _rated_extents(module, variables, x):
    """-> (location ids [B,6] of the box of every point the model rates positive, of the box of
    the best-rated point's region: what a model with target_tokens shows the LLM), from the
    ratings the model's own forward pass sows, computed once."""
    _, inter = module.apply(variables, **x, method=llm3d.LLM3D.prefix, mutable="intermediates")
    rating = inter["intermediates"]["point_ratings"][0]
    llm = module.config.llm
    plain = llm3d.extent_ids(rating, x["voxels"], x["point_mask"], llm)
    region = llm3d.extent_ids(rating, x["voxels"], x["point_mask"], llm, region=True)
    return np.asarray(plain) - LOC_OFFSET, np.asarray(region) - LOC_OFFSET


def held_out_accuracy(
    module,
    params,
    data,
    records,
    words,
    by_type: bool = False,
    blind: bool = False,
    boxes: bool = False,
) -> dict[str, float]:
    """-> Acc@0.25 / Acc@0.5 of the greedy answers (`answer`) and, with target tokens, of the box
    of the rated points itself (`rated`; `region`: its `rated_region` variant): the rated box
    bounds what copying it can reach. `by_type`: also the answers' Acc@0.25 per kind of
    referring expression (records' `qtype`: by name, colour, size, relation). Relational
    questions: exact match of the greedy answer (`relations EM`, and per type with `by_type`)."""
    config = DecodeConfig(max_new_tokens=ANSWER_LEN, loc_offset=LOC_OFFSET, loc_bins=256)
    ious = {"answer": [], "rated": [], "region": []}
    matches = {}  # relational question type -> [exact match, ...]
    for start in range(0, len(records), 50):
        part = records[start : start + 50]
        x = batch(data, part, words, np.random.default_rng(0), blind, boxes)
        inputs = {
            k: x[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")
        }
        generated, _ = generate(module, params, inputs, config)
        rated = region = None
        if module.config.target_tokens:
            rated, region = _rated_extents(module, {"params": params}, inputs)
        for row, (r, ids) in enumerate(zip(part, generated)):
            if "answer" in r:
                said = list(ids[: list(ids).index(EOS) + 1] if EOS in list(ids) else ids)
                truth = [i for i in answer_ids(r, words) if i != PAD]
                matches.setdefault(r["qtype"], []).append(float(said == truth))
                continue
            truth = np.array([r["box"]], float)
            box = [i - LOC_OFFSET for i in ids[:6] if LOC_OFFSET <= i < LOC_OFFSET + 256]
            iou = float(box_iou(np.array([box], float), truth)[0]) if len(box) == 6 else 0.0
            ious["answer"].append(iou)
            if rated is not None:
                ious["rated"].append(float(box_iou(rated[row : row + 1].astype(float), truth)[0]))
                ious["region"].append(float(box_iou(region[row : row + 1].astype(float), truth)[0]))
    out = {}
    for name, values in ious.items():
        if values:
            values = np.asarray(values)
            out[f"{name} Acc@0.25"] = 100 * float(np.mean(values >= 0.25))
            out[f"{name} Acc@0.5"] = 100 * float(np.mean(values >= 0.5))
    if matches:
        out["relations EM"] = 100 * float(np.mean(sum(matches.values(), [])))
    if by_type:
        for qtype, values in sorted(matches.items()):
            out[f"{qtype} ({len(values)}) EM"] = 100 * float(np.mean(values))
        qtypes = [r.get("qtype", "?") for r in records if "box" in r]
        for qtype in sorted(set(qtypes)):
            rows = [v for v, q in zip(ious["answer"], qtypes) if q == qtype]
            out[f"{qtype} ({len(rows)}) Acc@0.25"] = 100 * float(np.mean(np.asarray(rows) >= 0.25))
    return out


def train(args) -> None:
    def load(name):
        with open(os.path.join(args.data, name + ".jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        return dict(np.load(os.path.join(args.data, name + ".npz"))), records

    (train_data, train_records), (test_data, test_records) = load("train"), load("test")
    test_records = test_records[:: max(1, len(test_records) // args.test_questions)]
    test_records = test_records[: args.test_questions]
    overrides = {k: int(v) for k, v in (s.split("=", 1) for s in args.set)}
    width = train_data["features"].shape[-1]
    module = llm3d.LLM3D(llm3d.LLM3DConfig.demo(feature_dim=width, **overrides))
    params = llm3d.init_params(module, seed=0)
    schedule = optax.warmup_cosine_decay_schedule(
        0, args.lr, 50, max(args.steps, 100), args.lr / 10
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
    opt_state = tx.init(params)
    rates_points = bool(module.config.target_tokens)

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            inputs = {k: x[k] for k in llm3d.example_inputs(module.config)}
            logits, inter = module.apply({"params": p}, **inputs, mutable="intermediates")
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, x["answer_ids"])
            ce = jnp.sum(ce * x["answer_mask"]) / jnp.sum(x["answer_mask"])
            rating = jnp.float32(0)
            if rates_points:
                ratings = inter["intermediates"]["point_ratings"][0]
                roles = inter["intermediates"].get("role_ratings", (None,))[0]
                answered = jnp.ones(x["answer_ids"].shape, bool)
                total, count = rating_loss_sums(
                    ratings, x["point_target"], x["point_mask"], answered, roles
                )
                rating = total / count
            return ce + rating, (ce, rating)

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    words, rng, start, logged = Words(), np.random.default_rng(0), time.time(), []
    for r in train_records + test_records:
        words(r["prompt"])  # ids fixed before training
    blind = ", blind (features and voxels zero)" if args.blind else ""
    blind += ", the named objects' boxes in relational prompts" if args.boxes_in_prompt else ""
    print(f"oracle grounding: {overrides}{blind}, {len(train_records)} train questions")
    for i in range(1, args.steps + 1):
        picked = [train_records[k] for k in rng.choice(len(train_records), args.batch_size)]
        x = batch(train_data, picked, words, rng, args.blind, args.boxes_in_prompt)
        params, opt_state, losses = step(params, opt_state, x)
        logged.append([float(v) for v in losses])
        if i % 600 == 0 or i == args.steps:
            accuracy = held_out_accuracy(
                module,
                params,
                test_data,
                test_records,
                words,
                i == args.steps,
                args.blind,
                args.boxes_in_prompt,
            )
            ce, rating = np.mean(logged[-100:], axis=0)
            held_out = ", ".join(f"{k} {v:.1f}" for k, v in accuracy.items())
            print(
                f"step {i}: answer loss {ce:.3f}, rating loss {rating:.3f}, held-out "
                f"{held_out} ({time.time() - start:.0f} s)",
                flush=True,
            )


def extents(args) -> None:
    """What the extent rule costs with perfect ratings (the named object's points +1, the rest
    -1): held-out Acc@0.25 / Acc@0.5 of the box of all rated points and of `rated_region`'s
    box at several link radii."""
    with open(os.path.join(args.data, "test.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    records = [r for r in records if "box" in r]
    records = records[:: max(1, len(records) // 400)][:400]
    data = dict(np.load(os.path.join(args.data, "test.npz")))
    x = batch(data, records, Words(), np.random.default_rng(0))
    rating = jnp.asarray(np.where(x["point_target"] > 0, 1.0, -1.0), jnp.float32)
    truth = np.array([r["box"] for r in records], float)
    voxels = x["voxels"].astype(int)
    for radius in (16, 32, 48, None):
        if radius is None:
            inside = x["point_target"] > 0
        else:
            inside = np.asarray(llm3d.rated_region(rating, x["voxels"], x["point_mask"], radius))
        lo = np.where(inside[..., None], voxels, 255).min(1)
        hi = np.where(inside[..., None], voxels, 0).max(1)
        iou = box_iou(np.concatenate([lo, hi], 1).astype(float), truth)
        name = f"region, links <= {radius} voxels" if radius else "all rated points"
        print(
            f"perfect ratings, {name}: Acc@0.25 {100 * np.mean(iou >= 0.25):.1f}, "
            f"Acc@0.5 {100 * np.mean(iou >= 0.5):.1f} ({len(records)} questions)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data")
    data.add_argument("--rooms", type=int, required=True)
    data.add_argument("--seed", type=int, required=True)
    data.add_argument("--out", required=True, help="path without extension: OUT.npz, OUT.jsonl")
    data.add_argument(
        "--relations",
        action="store_true",
        help="also the relational QA questions (tools/demo.py's group: on, near, side, ...)",
    )
    data.add_argument(
        "--features",
        help="a folder of the rooms' lifted feature files (synth_<index>.npz, python -m "
        "data_pipeline.features on rooms of --seed) to use instead of the oracle's one-hots",
    )
    run = sub.add_parser("train")
    run.add_argument("--data", required=True, help="folder with train.* and test.*")
    run.add_argument("--steps", type=int, default=1200)
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--lr", type=float, default=5e-4)
    run.add_argument("--set", action="append", default=[], help="LLM3DConfig field=int")
    run.add_argument("--test-questions", type=int, default=400, help="held-out questions asked")
    run.add_argument(
        "--blind", action="store_true", help="the baseline without 3D input: features zero"
    )
    run.add_argument(
        "--boxes-in-prompt",
        action="store_true",
        help="relational prompts end with the true boxes of the objects they name (location "
        "tokens): can the LLM relate boxes it is given?",
    )
    rule = sub.add_parser("extents", help="the extent rule's cost with perfect ratings")
    rule.add_argument("--data", required=True, help="folder with test.*")
    args = parser.parse_args(argv)
    if args.command == "data":
        make_data(args.rooms, args.seed, args.out, args.features, args.relations)
    elif args.command == "extents":
        extents(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
