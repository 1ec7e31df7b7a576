r"""Evaluates a trained 3D-LLM: generation on a split, then the papers' metrics.

    python experiments/eval.py --workdir RUN [--split validation] [--strategy greedy|beam|sample]
    python experiments/eval.py --checkpoint RUN/checkpoints/300 --split val
    python experiments/eval.py --pretrained 3dllm.pth --base BLIP2_DIR --data_dir TFDS --out DIR \
        [--config experiments/configs/scanqa_flant5xl.py]

Writes DIR/eval/predictions.jsonl (one row per record: prompt, prediction with boxes in metres,
answers), DIR/eval/metrics.json and DIR/eval/metrics.md (our numbers beside the published ones),
where DIR is --workdir, --checkpoint or --out. `--pretrained` evaluates a model as it is, no
training run needed: a released 3D-LLM LAVIS .pth over its HF BLIP-2 FlanT5 directory (--base),
with the data and model settings of a run config (--config: experiments/configs/*.py or a run's
config.json; default scanqa_flant5xl.py). Metrics per (dataset, task): grounding -> Acc@0.25,
Acc@0.5, mIoU of the first predicted box against the first box of the first answer; every other
task -> BLEU-1..4, METEOR, ROUGE-L, CIDEr, EM, EM-refined with `<box>`/`<pt>` spans removed from
both sides; sqa3d and 3dmv_vqa also EM per question type (sqa3d: the first word of the question's
last sentence; 3dmv_vqa: the record's meta.question_type, concept / counting / relation /
comparison). 3dmv_vqa prediction rows carry their record's `question_type` and `question_id`
(what `python -m llm3d_jax.evaluate --task 3dmv_vqa` matches them by). Sections: model, data,
generation, metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from tqdm import tqdm

from llm3d_jax import tokens
from llm3d_jax.data.pipeline import load_tokenizer, make_eval_iterator, parse_mixture
from llm3d_jax.data.sources import LANGUAGE_DATASET, SceneJoin, language_record, open_source
from llm3d_jax.evaluate import (
    caption_metrics_by_group,
    em_by_question_type,
    grounding_metrics,
    last_question,
    navigation_metrics,
    sqa3d_question_type,
    strip_locations,
)
from llm3d_jax.fileio import InputError, cli_main, write_jsonl_atomic, write_text_atomic
from llm3d_jax.infer.decode import DecodeConfig, add_decode_arguments, decode_settings
from llm3d_jax.infer.generate import decode_answer, generate
from llm3d_jax.infer.restore import RunModel, load_pretrained, load_run, read_config

DEFAULT_PRETRAINED_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "scanqa_flant5xl.py")
SPLITS = {"val": "validation", "validation": "validation", "train": "train"}
TEXT_COLUMNS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "EM", "EM-refined")
GROUNDING_COLUMNS = ("Acc@0.25", "Acc@0.5", "mIoU")

# Published numbers (docs/reference.md "Published results"), shown beside ours in metrics.md.
SCANQA_VAL = {
    "ScanQA": (30.2, 10.1, 13.1, 33.3, 64.9, 21.0),
    "3D-LLM (BLIP2-flant5)": (39.3, 12.0, 14.5, 35.7, 69.4, 20.5),
    "LL3DA": (None, 13.5, 15.9, 37.3, 76.8, None),
    "Chat-Scene": (43.2, 14.3, 18.0, 41.6, 87.7, 21.6),
    "LLaVA-3D": (None, 14.5, 20.7, 50.1, 91.7, 27.0),
    "Video-3D LLM": (47.1, 16.2, 19.8, 49.0, 102.1, 30.1),
}
SCANREFER_ACC25 = {"3D-LLM": 30.3, "ScanRefer": 41.2, "Chat-Scene": 55.5, "Video-3D LLM": 58.1}


# ---------------------------------------------------------------------- model


# ---------------------------------------------------------------------- generation

# Datasets whose records name their question type and id in meta (scored per type; the scorer
# matches the rows by question_id).
TYPED_DATASETS = ("3dmv_vqa",)


def question_fields(data_dir: str, name: str, split: str) -> dict[str, dict]:
    """record id -> {question_type, question_id} from the meta of every record of `name`/`split`."""
    source = open_source(data_dir, LANGUAGE_DATASET, name, split)
    fields = {}
    for index in range(len(source)):
        record = language_record(source[index])
        meta = record["meta"]
        fields[record["id"]] = {
            "question_type": str(meta.get("question_type", "unknown")),
            "question_id": meta.get("question_id"),
        }
    return fields


def predict(
    run: RunModel,
    data_dir: str,
    split: str,
    batch_size: int,
    decode: DecodeConfig,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Generates an answer for every record of `split` -> prediction rows (module doc)."""
    data_config = dict(run.config.data)
    read_threads = data_config.pop("read_threads", 2)
    name = parse_mixture(data_config["datasets"])[0][0]
    try:
        total = len(SceneJoin.open(data_dir, name, split))
    except FileNotFoundError as err:
        raise InputError(data_dir, f"no {name}/{split} data ({err})") from None
    iterator = make_eval_iterator(
        data_dir,
        run.tokenizer_path,
        batch_size=batch_size,
        seed=seed,
        split=split,
        read_threads=read_threads,
        loc_bins=run.module.config.llm.loc_bins,
        profile=run.config.get("profile", "ours"),  # the release profile's question and points
        **data_config,
    )
    tokenizer = load_tokenizer(run.tokenizer_path)
    tokens.add_location_tokens(tokenizer, run.module.config.llm.loc_bins)
    llm = run.module.config.llm
    if iterator.loc_offset != llm.loc_offset:
        raise InputError(
            run.tokenizer_path,
            f"tokenizer puts <loc0> at {iterator.loc_offset}, the model at {llm.loc_offset}",
        )
    rows, rng = [], jax.random.key(seed)
    wanted = total if limit is None else min(limit, total)
    bar = tqdm(total=wanted, desc=f"generate {name}/{split}", unit="rec")
    for batch_index, batch in enumerate(iterator):
        meta = iterator.last_metadata
        inputs = {
            k: batch[k] for k in ("features", "voxels", "point_mask", "prompt_ids", "prompt_mask")
        }
        ids, scores = generate(
            run.module, run.params, inputs, decode, rng=jax.random.fold_in(rng, batch_index)
        )
        for m, row_ids, score in zip(meta, ids, scores):
            if not m["valid"] or len(rows) >= wanted:
                continue
            answer = decode_answer(
                tokenizer,
                row_ids,
                eos_id=decode.eos_id,
                loc_offset=llm.loc_offset,
                loc_bins=llm.loc_bins,
                grid_origin=m["grid_origin"],
                grid_voxel=m["grid_voxel"],
                score=float(score),
            )
            rows.append(
                dict(
                    id=m["id"],
                    scene_id=m["scene_id"],
                    dataset=m["dataset"],
                    task=m["task"],
                    prompt=m["prompt"],
                    prediction=answer.text,
                    answers=m["answers"],
                    boxes=answer.boxes.tolist(),
                    points=answer.points.tolist(),
                    object_ids=m["object_ids"],
                    score=answer.score,
                )
            )
            bar.update(1)
        if len(rows) >= wanted:
            break
    bar.close()
    if name in TYPED_DATASETS:
        fields = question_fields(data_dir, name, split)
        for row in rows:
            row.update(fields.get(row["id"], {"question_type": "unknown", "question_id": None}))
    return rows


# ---------------------------------------------------------------------- metrics


def compute_metrics(rows: list[dict]) -> dict:
    """{"<dataset>/<task>": {metric: value, "count": n}} over the prediction rows."""
    groups = defaultdict(list)
    for row in rows:
        groups[f"{row['dataset']}/{row['task']}"].append(row)
    out, text_groups = {}, {}
    for key, group in sorted(groups.items()):
        if key.endswith("/grounding"):
            pred, gt = [], []
            for row in group:
                try:
                    boxes = tokens.parse_boxes(row["answers"][0])
                except ValueError:
                    boxes = np.zeros((0, 6))
                if len(boxes):
                    gt.append(boxes[0])
                    pred.append(row["boxes"][0] if row["boxes"] else None)
            if gt:
                out[key] = {
                    **grounding_metrics(pred, np.asarray(gt)),
                    "without box": 100.0 * sum(p is None for p in pred) / len(pred),
                    "count": len(gt),
                    "skipped_without_gt_box": len(group) - len(gt),
                }
            continue
        if key.endswith("/navigation"):
            pred = [np.asarray(r["points"], np.float64).reshape(-1, 3) for r in group]
            gt = [tokens.parse_points(r["answers"][0]) for r in group]
            out[key] = {**navigation_metrics(pred, gt), "count": len(group)}
            continue
        preds = {r["id"]: strip_locations(r["prediction"]) for r in group}
        refs = {r["id"]: [strip_locations(a) for a in r["answers"]] for r in group}
        if not any(a for answers in refs.values() for a in answers):
            continue  # answers are locations only: no text to score
        text_groups[key] = (preds, refs)
    # One PTB tokenizer call and one METEOR JVM for all text groups.
    for key, scores in (caption_metrics_by_group(text_groups) if text_groups else {}).items():
        if key.startswith("sqa3d/"):
            preds, refs = text_groups[key]
            prompts = {r["id"]: r["prompt"] for r in groups[key]}
            types = {i: sqa3d_question_type(last_question(prompts[i])) for i in preds}
            scores.update(em_by_question_type(preds, refs, types))
        elif key.split("/")[0] in TYPED_DATASETS:
            preds, refs = text_groups[key]
            types = {r["id"]: r.get("question_type", "unknown") for r in groups[key]}
            scores.update(em_by_question_type(preds, refs, types))
        out[key] = {**scores, "count": len(text_groups[key][0])}
    return dict(sorted(out.items()))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(metrics: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    text = {k: v for k, v in metrics.items() if "BLEU-1" in v}
    ground = {k: v for k, v in metrics.items() if "Acc@0.25" in v}
    if text:
        lines += [
            "| ours: dataset/task | n | " + " | ".join(TEXT_COLUMNS) + " |",
            "|---" * (len(TEXT_COLUMNS) + 2) + "|",
        ]
        lines += [
            f"| {k} | {v['count']} | " + " | ".join(_fmt(v[c]) for c in TEXT_COLUMNS) + " |"
            for k, v in text.items()
        ]
        lines += [
            "",
            "Published, ScanQA validation (docs/reference.md):",
            "",
            "| system | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr | EM |",
            "|---" * 7 + "|",
        ]
        lines += [
            f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |"
            for name, vals in SCANQA_VAL.items()
        ]
        lines.append("")
    if ground:
        lines += [
            "| ours: dataset/task | n | " + " | ".join(GROUNDING_COLUMNS) + " |",
            "|---" * (len(GROUNDING_COLUMNS) + 2) + "|",
        ]
        lines += [
            f"| {k} | {v['count']} | " + " | ".join(_fmt(v[c]) for c in GROUNDING_COLUMNS) + " |"
            for k, v in ground.items()
        ]
        lines += [
            "",
            "Published, ScanRefer Acc@0.25: "
            + ", ".join(f"{k} {v}" for k, v in SCANREFER_ACC25.items()),
            "",
        ]
    typed = {k: v for k, v in metrics.items() if any(m.startswith("EM/") for m in v)}
    if typed:
        lines += ["| ours: dataset/task | question type | EM |", "|---" * 3 + "|"]
        lines += [
            f"| {k} | {m[len('EM/') :]} | {_fmt(value)} |"
            for k, v in typed.items()
            for m, value in v.items()
            if m.startswith("EM/")
        ]
        lines.append("")
    navigation = {k: v for k, v in metrics.items() if "goal_error_m" in v}
    if navigation:
        lines += ["| ours: dataset/task | n | Success@0.5m | goal error (m) |", "|---" * 4 + "|"]
        lines += [
            f"| {k} | {v['count']} | {_fmt(v['Success@0.5m'])} | {v['goal_error_m']:.2f} |"
            for k, v in navigation.items()
        ]
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="run folder of experiments/train.py (latest checkpoint)")
    where.add_argument("--checkpoint", help="a checkpoints folder or one step folder")
    where.add_argument(
        "--pretrained", help="a model to evaluate as it is: a released 3D-LLM LAVIS .pth (--base)"
    )
    parser.add_argument("--base", help="with --pretrained: its HF BLIP-2 FlanT5 directory")
    parser.add_argument(
        "--config",
        help="with --pretrained: run config (experiments/configs/*.py or a run's config.json) "
        "giving the data and model settings (default: configs/scanqa_flant5xl.py)",
    )
    parser.add_argument("--out", help="with --pretrained: folder to write eval/ into")
    parser.add_argument("--split", default="validation", help="validation (val) or train")
    parser.add_argument("--data_dir", help="TFDS folder (default: the run config's data_dir)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--max_new_tokens", type=int, help="default: the run's answer_len")
    parser.add_argument("--seed", type=int, default=0)
    add_decode_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from absl import logging as absl_logging

    # orbax logs every restore step, and a warning for each checkpoint item left unread.
    absl_logging.set_verbosity(absl_logging.ERROR)
    args = parse_args(argv)
    if args.split not in SPLITS:
        raise InputError(None, f"--split must be one of {sorted(SPLITS)}, got {args.split!r}")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise InputError(None, "--batch_size and --limit must be >= 1")
    start = time.perf_counter()
    if args.pretrained:
        if not args.out:
            raise InputError(None, "--pretrained needs --out DIR (DIR/eval/ gets the results)")
        config_path = args.config or DEFAULT_PRETRAINED_CONFIG
        config = read_config(config_path)
        config.model.pretrained = args.pretrained
        if args.base:
            config.model.base = args.base
        try:
            run = load_pretrained(config)
        except InputError as err:
            if err.path is None:  # a bad config value: name the config file
                raise InputError(config_path, err.problem) from None
            raise
        target = args.out
        print(f"model: {args.pretrained} as it is")
    else:
        if args.base or args.config or args.out:
            raise InputError(None, "--base, --config and --out go with --pretrained")
        target = args.workdir or args.checkpoint
        run = load_run(target)
        print(f"model: step {run.step} of {target}")
    out_dir = os.path.join(target, "eval")
    data_dir = args.data_dir or run.config.get("data_dir", "")
    if run.config.get("data_source", "tfds") != "tfds" and not args.data_dir:
        raise InputError(target, "the run trained on synthetic batches; pass --data_dir TFDS_DIR")
    if not data_dir or not os.path.isdir(data_dir):
        raise InputError(data_dir or target, "TFDS data folder not found (--data_dir)")
    tokenizer = load_tokenizer(run.tokenizer_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        llm = run.module.config.llm
        decode = DecodeConfig(
            **{
                **dict(
                    max_new_tokens=args.max_new_tokens or int(run.config.data.answer_len),
                    eos_id=llm.eos_token_id,
                    pad_id=pad,
                    # T5 starts decoding from this token; the penalties count it as transformers
                    start_id=getattr(llm, "decoder_start_token_id", None),
                    loc_offset=llm.loc_offset,
                    loc_bins=llm.loc_bins,
                ),
                **decode_settings(args),
            }
        )
    except ValueError as err:
        raise InputError(None, str(err)) from None

    rows = predict(
        run, data_dir, SPLITS[args.split], args.batch_size, decode, args.limit, args.seed
    )
    write_jsonl_atomic(os.path.join(out_dir, "predictions.jsonl"), rows)
    print(f"generation: {len(rows)} records in {time.perf_counter() - start:.1f} s")

    metrics = compute_metrics(rows)
    summary = {
        "step": run.step,
        "split": SPLITS[args.split],
        "data_dir": os.path.abspath(data_dir),
        "decode": decode.__dict__,
        "metrics": metrics,
    }
    write_text_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(summary, indent=2) + "\n")
    table = markdown(
        metrics,
        f"Evaluation of {args.pretrained} as it is ({SPLITS[args.split]}, {args.strategy})"
        if args.pretrained
        else f"Evaluation of {target} (step {run.step}, {SPLITS[args.split]}, {args.strategy})",
    )
    write_text_atomic(os.path.join(out_dir, "metrics.md"), table)
    print(table)
    print(f"wrote {out_dir}/predictions.jsonl, metrics.json, metrics.md")
    return 0


if __name__ == "__main__":
    cli_main(main)
