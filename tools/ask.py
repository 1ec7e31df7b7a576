r"""Asks an exported 3D-LLM questions about scenes; prints (or writes) the answers and their boxes.

    python tools/ask.py --model MODEL --scene FEATURES/scene0000_00.npz "Where is the chair?"
        [--task qa] [--strategy greedy|beam|sample] [--png answer.png]
    python tools/ask.py --model MODEL --scene FEATURES/<uid>.npz --task object_caption
    python tools/ask.py --model MODEL --questions Q.jsonl --out A.jsonl [--batch_size 8]

The question may hold locations in metres (`<box>x0 y0 z0 x1 y1 z1</box>`, `<pt>x y z</pt>`);
the prompt template the model was trained with for --task is applied. Boxes in the answer are
printed in metres with the scene object they overlap most; --png renders them over the scene.

--task object_caption describes the one object of an object-level scene file (Objaverse, or
`python -m data_pipeline.scenes.synthetic --objects`) the way the released 3D-LLM's inference.py
does: the question defaults to its prompt, "Describe the 3D scene.", and decoding to its
settings (`llm3d_jax.infer.decode.TASK_DECODING`: repetition penalty 1.5, at most 50 new
tokens) unless options say otherwise. --max_new_tokens: default the model's answer length.

--questions: one JSON object a line, {"id", "scene", "question", "task"} (scene: a feature file,
relative to the current folder; task optional, default --task; question optional for
object_caption, which has its fixed prompt). The model is loaded and its
generate function compiled once; questions are answered --batch_size at a time (the last batch
padded, prompts padded to the model's prompt length, so every batch has the same shapes). Each
output line is the input line plus "answer" (text with `<box>`/`<pt>` in metres) and "boxes"
(a list of [x0, y0, z0, x1, y1, z1] in metres, maybe empty). A bad line (not JSON, a missing
field, a missing or bad scene file, a question too long) is reported on stderr and skipped;
the rest are answered, A.jsonl is written whole (atomically) and the exit status is 1 when
something was skipped. One question in a batch of its own gives the same answer as the
single-question form (greedy and beam; sampling draws one key per batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm3d_jax.data.preprocess import (  # noqa: E402
    TextEncoder,
    apply_template,
    release_question,
    sample_points,
)
from llm3d_jax.datasets import OBJECT_CAPTION_PROMPT  # noqa: E402
from llm3d_jax.evaluate import box_iou  # noqa: E402
from llm3d_jax.fileio import (  # noqa: E402
    InputError,
    check_output_file,
    cli_main,
    load_npz,
    write_jsonl_atomic,
    writing,
)
from llm3d_jax.infer.decode import (  # noqa: E402
    TASK_DECODING,
    DecodeConfig,
    add_decode_arguments,
    decode_settings,
)
from llm3d_jax.infer.generate import Answer, decode_answer, encode_prompt, generate_fn  # noqa: E402
from llm3d_jax.loading import load_exported_bundle  # noqa: E402

SCENE_KEYS = ("points", "features", "voxels", "grid_origin", "grid_voxel")
QUESTION_FIELDS = ("id", "scene", "question")
VOXEL_MAX = 255  # voxels index the scene's 256^3 grid (llm3d_jax.tokens)


def load_scene(path: str, feature_dim: int) -> dict:
    """A scene feature file, checked: shapes, dtypes, finite values, voxels on the grid."""
    scene = load_npz(path, required=SCENE_KEYS)
    points, features, voxels = scene["points"], scene["features"], scene["voxels"]
    if features.ndim != 2 or len(features) != len(points) or len(features) == 0:
        raise InputError(path, f"features {features.shape} do not match points {points.shape}")
    if features.shape[1] != feature_dim:
        raise InputError(
            path, f"features are {features.shape[1]}-d, the model expects {feature_dim}-d features"
        )
    if voxels.shape != points.shape:
        raise InputError(path, f"voxels {voxels.shape} do not match points {points.shape}")
    for name in ("points", "features", "grid_origin", "grid_voxel"):
        if not np.issubdtype(scene[name].dtype, np.floating):
            raise InputError(path, f"{name} must be floating point, got {scene[name].dtype}")
        if not np.isfinite(scene[name]).all():
            raise InputError(path, f"{name} hold non-finite values (NaN or Inf)")
    if not np.issubdtype(voxels.dtype, np.integer):
        raise InputError(path, f"voxels must be integers, got {voxels.dtype}")
    if voxels.min() < 0 or voxels.max() > VOXEL_MAX:
        raise InputError(
            path, f"voxels outside [0, {VOXEL_MAX}] (min {voxels.min()}, max {voxels.max()})"
        )
    if scene["grid_origin"].shape != (3,) or scene["grid_voxel"].size != 1:
        raise InputError(path, "bad grid: grid_origin must be 3 numbers, grid_voxel one number")
    if not scene["grid_voxel"].reshape(()) > 0:
        raise InputError(path, f"bad grid: grid_voxel {scene['grid_voxel']} must be > 0")
    return scene


@dataclasses.dataclass
class AskModel:
    """An exported model ready to answer: params, tokenizer, templates and one compiled
    generate function for [batch_size, prompt_len] batches."""

    module: object
    params: dict
    tokenizer: object
    encoder: TextEncoder
    info: dict
    decode: DecodeConfig
    batch_size: int
    generate: object  # jitted run(params, inputs, rng) -> (ids, scores)


def load_model(model_dir: str, decode: dict | None = None, batch_size: int = 1) -> AskModel:
    if batch_size < 1:
        raise InputError(None, f"--batch_size must be >= 1, got {batch_size}")
    module, params, tokenizer, description = load_exported_bundle(model_dir)
    if tokenizer is None:
        raise InputError(model_dir, "the exported model has no tokenizer; it cannot read questions")
    llm = module.config.llm
    encoder = TextEncoder.create(tokenizer, llm.loc_bins)
    if encoder.loc_offset != llm.loc_offset:
        raise InputError(
            model_dir,
            f"tokenizer puts <loc0> at {encoder.loc_offset}, the model at {llm.loc_offset}",
        )
    info = description["inference"]
    for key in ("num_points", "prompt_len", "answer_len"):
        if key not in info:
            raise InputError(model_dir, f"llm3d_config.json: inference.{key} missing")
    # The location grammar is on unless `decode` turns it off (loc_bins=0, --free_locations);
    # `decode` may also set max_new_tokens.
    settings = dict(
        max_new_tokens=int(info["answer_len"]),
        eos_id=encoder.eos_id,
        pad_id=encoder.pad_id,
        # T5 starts decoding from this token, and the penalties count it as transformers does
        start_id=getattr(llm, "decoder_start_token_id", None),
        loc_offset=llm.loc_offset,
        loc_bins=llm.loc_bins,
    )
    try:
        config = DecodeConfig(**{**settings, **(decode or {})})
    except ValueError as err:
        raise InputError(None, str(err)) from None
    run = jax.jit(generate_fn(module, config))
    return AskModel(module, params, tokenizer, encoder, info, config, batch_size, run)


def prepare(model: AskModel, scene: dict, question: str, task: str, seed: int = 0) -> dict:
    """One question about one scene -> the model's input row (prompt padded to prompt_len);
    InputError("question", ...) when the question does not fit."""
    template = model.info.get("prompt_templates", {}).get(task, "{prompt}")
    profile = model.info.get("profile", "ours")  # a model trained with the release profile
    prompt = (
        release_question(question) if profile == "release" else apply_template(template, question)
    )
    prompt_len = int(model.info["prompt_len"])
    try:
        prompt_ids = encode_prompt(
            model.encoder,
            prompt,
            scene["grid_origin"],
            scene["grid_voxel"],
            prompt_len,
        )
    except ValueError as err:
        raise InputError("question", str(err)) from None
    features, voxels, mask = sample_points(
        scene, int(model.info["num_points"]), np.random.default_rng(seed), profile=profile
    )
    pad = prompt_len - len(prompt_ids)
    return dict(
        features=features.astype(np.float32),
        voxels=voxels,
        point_mask=mask,
        prompt_ids=np.asarray(prompt_ids + [model.encoder.pad_id] * pad, np.int32),
        prompt_mask=np.arange(prompt_len) < len(prompt_ids),
    )


def answer_rows(
    model: AskModel, rows: list[dict], scenes: list[dict], seed: int = 0
) -> list[Answer]:
    """Answers prepared rows, `model.batch_size` at a time (the last batch padded with copies
    of its last row, so every call has the shapes the generate function was compiled for)."""
    llm = model.module.config.llm
    answers = []
    for start in range(0, len(rows), model.batch_size):
        chunk = rows[start : start + model.batch_size]
        chunk = chunk + [chunk[-1]] * (model.batch_size - len(chunk))
        inputs = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        rng = jax.random.key(seed) if model.decode.strategy == "sample" else None
        ids, scores = jax.device_get(model.generate(model.params, inputs, rng))
        for k, scene in enumerate(scenes[start : start + model.batch_size]):
            answers.append(
                decode_answer(
                    model.tokenizer,
                    ids[k],
                    eos_id=model.encoder.eos_id,
                    loc_offset=llm.loc_offset,
                    loc_bins=llm.loc_bins,
                    grid_origin=scene["grid_origin"],
                    grid_voxel=scene["grid_voxel"],
                    score=float(scores[k]),
                )
            )
    return answers


def ask(
    model_dir: str,
    scene_path: str,
    question: str,
    task: str = "qa",
    decode: dict | None = None,
    seed: int = 0,
) -> tuple[Answer, dict]:
    """-> (answer, scene arrays)."""
    model = load_model(model_dir, decode)
    scene = load_scene(scene_path, model.module.config.feature_dim)
    row = prepare(model, scene, question, task, seed)
    return answer_rows(model, [row], [scene], seed)[0], scene


def read_questions(path: str, task: str = "qa") -> tuple[list[tuple[int, dict]], list[str]]:
    """-> ([(line number, question dict)], [problems of the lines skipped]). A line whose task
    (its own, else `task`) is object_caption may leave out the question: the fixed prompt."""
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    items, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: not JSON ({err.msg})")
                continue
            if not isinstance(item, dict):
                problems.append(f"{path}:{number}: not a JSON object")
                continue
            if "task" in item and not isinstance(item["task"], str):
                problems.append(f"{path}:{number}: missing or not a string: task")
                continue
            if item.get("task", task) == "object_caption" and "question" not in item:
                item["question"] = OBJECT_CAPTION_PROMPT
            bad = [k for k in QUESTION_FIELDS if not isinstance(item.get(k), str) or not item[k]]
            if bad:
                problems.append(f"{path}:{number}: missing or not a string: {', '.join(bad)}")
                continue
            items.append((number, item))
    return items, problems


def ask_many(
    model_dir: str,
    questions_path: str,
    out_path: str,
    task: str = "qa",
    decode: dict | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[int, list[str]]:
    """Answers every good line of `questions_path` into `out_path` (module doc)
    -> (number answered, problems of the lines skipped)."""
    check_output_file(out_path)
    items, problems = read_questions(questions_path, task)
    model = load_model(model_dir, decode, batch_size)
    feature_dim = model.module.config.feature_dim
    scenes: dict[str, dict | InputError] = {}
    kept, rows, row_scenes = [], [], []
    for number, item in items:
        if item["scene"] not in scenes:
            try:
                scenes[item["scene"]] = load_scene(item["scene"], feature_dim)
            except InputError as err:
                scenes[item["scene"]] = err
        scene = scenes[item["scene"]]
        try:
            if isinstance(scene, InputError):
                raise scene
            rows.append(prepare(model, scene, item["question"], item.get("task", task), seed))
        except InputError as err:
            problems.append(f"{questions_path}:{number}: {err}")
            continue
        kept.append(item)
        row_scenes.append(scene)
    answers = answer_rows(model, rows, row_scenes, seed)
    out = [
        dict(item, answer=a.text, boxes=[[float(v) for v in b] for b in a.boxes])
        for item, a in zip(kept, answers)
    ]
    with writing(out_path):
        write_jsonl_atomic(out_path, out)
    return len(out), problems


def describe_boxes(answer: Answer, scene: dict) -> list[str]:
    lines = []
    labels, boxes = scene.get("object_labels"), scene.get("object_boxes")
    for k, box in enumerate(answer.boxes):
        line = f"box {k}: " + " ".join(f"{v:.3f}" for v in box) + " (m)"
        if boxes is not None and len(boxes):
            iou = box_iou(boxes.reshape(-1, 6), box)
            best = int(np.argmax(iou))
            line += f"  best match: {labels[best]} (id {int(scene['object_ids'][best])}), IoU {iou[best]:.2f}"
        lines.append(line)
    for k, point in enumerate(answer.points):
        lines.append(f"point {k}: " + " ".join(f"{v:.3f}" for v in point) + " (m)")
    return lines


def parse_args(argv=None):
    """The options, with --task's release defaults (TASK_DECODING, the object prompt) filled in
    where the command line leaves them."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="directory written by tools/export.py")
    parser.add_argument("--scene", help="scene feature file (.npz) of the single question")
    parser.add_argument("question", nargs="?", help="the single question")
    parser.add_argument("--questions", help="JSONL of questions to answer in one process")
    parser.add_argument("--out", help="JSONL of answers (with --questions)")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per batch")
    parser.add_argument(
        "--task",
        default="qa",
        help="selects the prompt template (qa, caption, grounding, object_caption, ...)",
    )
    add_decode_arguments(parser)
    parser.add_argument(
        "--max_new_tokens", type=int, help="answer length limit (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", help="also render the scene with the answer's boxes")
    args = parser.parse_args(argv)
    if args.task in TASK_DECODING:
        parser.set_defaults(**TASK_DECODING[args.task])
        args = parser.parse_args(argv)
    if args.task == "object_caption" and args.question is None and not args.questions:
        args.question = OBJECT_CAPTION_PROMPT
    return args


def main(argv=None) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    args = parse_args(argv)
    try:
        decode = decode_settings(args)
    except ValueError as err:
        raise InputError(None, str(err)) from None
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise InputError(None, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
        decode["max_new_tokens"] = args.max_new_tokens
    if args.questions:
        if args.question or args.scene or args.png or not args.out:
            raise InputError(None, "--questions takes --out, and no --scene, --png or question")
        done, problems = ask_many(
            args.model, args.questions, args.out, args.task, decode, args.seed, args.batch_size
        )
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        print(f"wrote {args.out}: {done} answers, {len(problems)} lines skipped")
        return 1 if problems else 0
    if not (args.scene and args.question) or args.out:
        raise InputError(
            None, "ask one question (--scene S QUESTION) or many (--questions Q --out A)"
        )
    if args.png:
        check_output_file(args.png)
    answer, scene = ask(args.model, args.scene, args.question, args.task, decode, args.seed)
    print(answer.text)
    for line in describe_boxes(answer, scene):
        print(line)
    if args.png:
        from llm3d_jax.evaluate.picture import load_scene as load_for_render
        from llm3d_jax.evaluate.picture import render

        render(
            load_for_render(args.scene),
            args.png,
            (),
            list(answer.boxes),
            f"{args.question}\n-> {answer.text}"[:200],
        )
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    cli_main(main)
