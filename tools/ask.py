r"""Asks an exported 3D-LLM a question about one scene; prints the answer and its boxes.

    python tools/ask.py --model MODEL --scene FEATURES/scene0000_00.npz "Where is the chair?"
        [--task qa] [--strategy greedy|beam|sample] [--png answer.png]

The question may hold locations in metres (`<box>x0 y0 z0 x1 y1 z1</box>`, `<pt>x y z</pt>`);
the prompt template the model was trained with for --task is applied. Boxes in the answer are
printed in metres with the scene object they overlap most; --png renders them over the scene.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm3d_jax.data.preprocess import TextEncoder, apply_template, sample_points  # noqa: E402
from llm3d_jax.evaluate import box_iou  # noqa: E402
from llm3d_jax.fileio import InputError, cli_main, load_npz  # noqa: E402
from llm3d_jax.infer.decode import STRATEGIES, DecodeConfig  # noqa: E402
from llm3d_jax.infer.generate import Answer, decode_answer, encode_prompt, generate  # noqa: E402
from llm3d_jax.loading import load_exported_bundle  # noqa: E402

SCENE_KEYS = ("points", "features", "voxels", "grid_origin", "grid_voxel")


def load_scene(path: str, feature_dim: int) -> dict:
    scene = load_npz(path, required=SCENE_KEYS)
    features = scene["features"]
    if features.ndim != 2 or len(features) != len(scene["points"]) or len(features) == 0:
        raise InputError(
            path, f"features {features.shape} do not match points {scene['points'].shape}"
        )
    if features.shape[1] != feature_dim:
        raise InputError(
            path, f"features are {features.shape[1]}-d, the model expects {feature_dim}-d features"
        )
    if scene["voxels"].shape != scene["points"].shape:
        raise InputError(
            path, f"voxels {scene['voxels'].shape} do not match points {scene['points'].shape}"
        )
    return scene


def ask(
    model_dir: str,
    scene_path: str,
    question: str,
    task: str = "qa",
    decode: dict | None = None,
    seed: int = 0,
) -> tuple[Answer, dict]:
    """-> (answer, scene arrays)."""
    module, params, tokenizer, description = load_exported_bundle(model_dir)
    if tokenizer is None:
        raise InputError(model_dir, "the exported model has no tokenizer; it cannot read questions")
    info = description["inference"]
    llm = module.config.llm
    scene = load_scene(scene_path, module.config.feature_dim)
    encoder = TextEncoder.create(tokenizer, llm.loc_bins)
    if encoder.loc_offset != llm.loc_offset:
        raise InputError(
            model_dir,
            f"tokenizer puts <loc0> at {encoder.loc_offset}, the model at {llm.loc_offset}",
        )
    template = info.get("prompt_templates", {}).get(task, "{prompt}")
    try:
        prompt_ids = encode_prompt(
            encoder,
            apply_template(template, question),
            scene["grid_origin"],
            scene["grid_voxel"],
            int(info["prompt_len"]),
        )
    except ValueError as err:
        raise InputError("question", str(err)) from None
    features, voxels, mask = sample_points(
        scene, int(info["num_points"]), np.random.default_rng(seed)
    )
    inputs = dict(
        features=features[None].astype(np.float32),
        voxels=voxels[None],
        point_mask=mask[None],
        prompt_ids=np.asarray([prompt_ids], np.int32),
        prompt_mask=np.ones((1, len(prompt_ids)), bool),
    )
    config = DecodeConfig(
        max_new_tokens=int(info["answer_len"]),
        eos_id=encoder.eos_id,
        pad_id=encoder.pad_id,
        **(decode or {}),
    )
    ids, scores = generate(module, params, inputs, config, rng=jax.random.key(seed))
    answer = decode_answer(
        tokenizer,
        ids[0],
        eos_id=encoder.eos_id,
        loc_offset=llm.loc_offset,
        loc_bins=llm.loc_bins,
        grid_origin=scene["grid_origin"],
        grid_voxel=scene["grid_voxel"],
        score=float(scores[0]),
    )
    return answer, scene


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


def main(argv=None) -> int:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="directory written by tools/export.py")
    parser.add_argument("--scene", required=True, help="scene feature file (.npz)")
    parser.add_argument("question")
    parser.add_argument(
        "--task", default="qa", help="selects the prompt template (qa, caption, grounding, ...)"
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", help="also render the scene with the answer's boxes")
    args = parser.parse_args(argv)
    decode = dict(
        strategy=args.strategy,
        num_beams=args.num_beams,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    try:
        DecodeConfig(**decode)
    except ValueError as err:
        raise InputError(None, str(err)) from None
    answer, scene = ask(args.model, args.scene, args.question, args.task, decode, args.seed)
    print(answer.text)
    for line in describe_boxes(answer, scene):
        print(line)
    if args.png:
        from tools.visualize import load_scene as load_for_render
        from tools.visualize import render

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
