r"""`make demo`: the whole 3D-LLM chain on synthetic scenes, a tiny model and a CPU.

    python -m tools.demo --out demo_out [--scenes 32 --steps N]

Stages, each one of the project's command lines (so the demo shows exactly what a user runs),
each skipped when its output already exists (a rerun resumes):
  scenes -> renders + contact sheets -> fusion features (the demo ViT, masked crops) -> offline
  language data -> tokenizer -> TFDS -> fine-tune the pretrained 3D-LLM -> fine-tune the
  pretrained blind baseline (no 3D input) -> evaluate both on held-out scenes -> export -> ask
  -> PNGs (boxes, loss curves) -> table.

Like 3D-LLM (a pretrained BLIP-2, then 3D-language pretraining, then fine-tuning), the demo
starts from pretrained weights: assets/demo/, built by tools/pretrain_demo.py on rooms of
another seed than the demo's. The blind baseline is pretrained and fine-tuned exactly like the
3D-LLM, on the same rooms and steps, with its point features zeroed throughout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

from data_pipeline import feature_probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# Built by tools/pretrain_demo.py (rooms of seed 1000, never the demo's): the ViT that
# encodes the crops, and the 3D-LLM and blind models the demo fine-tunes.
ASSETS = os.path.join(REPO, "assets", "demo")
ENCODER = f"vit:{ASSETS}/encoder"
PRETRAINED = {"3d": f"{ASSETS}/pretrained_3d", "blind": f"{ASSETS}/pretrained_blind"}


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args: list[str], done_marker: str | None = None) -> None:
    """Runs one stage's command line; skipped when `done_marker` exists."""
    if done_marker and os.path.exists(done_marker):
        print(f"(done already: {os.path.relpath(done_marker)})", flush=True)
        return
    print("$", " ".join(os.path.relpath(a) if os.path.exists(a) else a for a in args), flush=True)
    start = time.time()
    subprocess.run(args, cwd=REPO, check=True)
    print(f"({time.time() - start:.0f} s)", flush=True)


def train_tokenizer(records: str, out_dir: str) -> None:
    from llm3d_jax.tokens import train_tokenizer as train

    texts = []
    with open(records, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts.append(r["prompt"])
            texts.extend(r["answers"])
    train(texts, vocab_size=1000, out_dir=out_dir)
    print(f"tokenizer: {out_dir} ({len(texts)} texts)")


def held_out_records(records: str, task: str) -> list[dict]:
    """The held-out records of `task` (the language stage's `meta.split` "val")."""
    with open(records, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    held_out = [r for r in rows if r["task"] == task and r["meta"].get("split") == "val"]
    if not held_out:
        raise SystemExit(f"error: {records}: no held-out record of task {task}")
    return held_out


def right_and_wrong(predictions: str) -> tuple[dict, dict]:
    """Two grounding predictions about one room for boxes.png: one the model got right (the best
    IoU, at least 0.5 where there is one) and one it got wrong (IoU below 0.25), from the room
    with the most grounding questions that has both; else the best and the worst answer."""
    from llm3d_jax.evaluate.grounding import answer_iou

    with open(predictions, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["task"] == "grounding"]
    if not rows:
        raise SystemExit(f"error: {predictions}: no grounding predictions")
    by_scene = collections.defaultdict(list)
    for r in rows:
        by_scene[r["scene_id"]].append((answer_iou(r) or 0.0, r["id"], r))
    for scene in sorted(by_scene, key=lambda s: -len(by_scene[s])):
        ranked = sorted(by_scene[scene], key=lambda x: x[:2])
        if ranked[-1][0] >= 0.5 and ranked[0][0] < 0.25:
            return ranked[-1][2], ranked[0][2]
    ranked = sorted(by_scene[max(by_scene, key=lambda s: len(by_scene[s]))], key=lambda x: x[:2])
    return ranked[-1][2], ranked[0][2]


def plot_losses(runs: dict[str, str], path: str) -> None:
    """Training (and validation) loss of every run on one PNG."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, workdir in runs.items():
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        steps, loss = zip(*[(r["step"], r["loss"]) for r in rows if "loss" in r])
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        # Each logged loss is one batch of 8: faint as logged, solid as a running mean of 20.
        line = ax.plot(steps, loss, alpha=0.2)[0]
        window = min(20, len(loss))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color=line.get_color(), label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"loss curves: {path}")


def table(runs: dict[str, str]) -> str:
    """Markdown: QA and grounding metrics of each run, side by side."""
    rows = [
        ("qa", "EM"),
        ("qa", "EM-refined"),
        ("qa", "BLEU-1"),
        ("qa", "CIDEr"),
        ("grounding", "Acc@0.25"),
        ("grounding", "Acc@0.5"),
        ("grounding", "mIoU"),
        ("dense_caption", "CIDEr"),
    ]
    metrics = {}
    for name, workdir in runs.items():
        with open(os.path.join(workdir, "eval", "metrics.json"), encoding="utf-8") as f:
            metrics[name] = json.load(f)

    def value(m: dict, task: str, key: str):
        return m["metrics"].get(f"synthetic/{task}", {}).get(key)

    lines = ["| task | metric | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for task, key in rows:
        cells = []
        for name in runs:
            v = value(metrics[name], task, key)
            cells.append("-" if v is None else f"{v:.1f}")
        lines.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# QA question types about where objects are relative to each other (the offline generator's)
RELATIONAL = ("between", "between_yn", "near", "on", "on_yn", "bigger", "taller", "side")
# and those that ask what one object (or the room's floor / walls) is like: colour, existence,
# count
ATTRIBUTE_QUESTIONS = (
    "color",
    "exist",
    "exist_color",
    "count",
    "count_color",
    "floor_color",
    "wall_color",
)


def category_prior_boxes(records: str, features: str) -> dict[str, list[float]]:
    """The no-model grounding baseline: the record id of every held-out grounding question ->
    the mean box (metres) of the training grounding answers about objects of its category."""
    import numpy as np

    from llm3d_jax import tokens
    from llm3d_jax.fileio import load_npz

    labels: dict[str, dict[int, str]] = {}

    def category(record: dict) -> str:
        scene = record["scene_id"]
        if scene not in labels:
            data = load_npz(f"{features}/{scene}.npz", required=("object_ids", "object_labels"))
            labels[scene] = dict(zip(data["object_ids"].tolist(), data["object_labels"].tolist()))
        return labels[scene][record["object_ids"][0]]

    with open(records, encoding="utf-8") as f:
        grounding = [r for r in map(json.loads, f) if r["task"] == "grounding"]
    boxes = collections.defaultdict(dict)  # category -> {(scene, object): box}
    for r in grounding:
        if r["meta"].get("split") == "train":
            key = (r["scene_id"], r["object_ids"][0])
            boxes[category(r)][key] = tokens.parse_boxes(r["answers"][0])[0]
    mean = {c: np.mean(list(b.values()), axis=0).tolist() for c, b in boxes.items()}
    return {r["id"]: mean.get(category(r)) for r in grounding if r["meta"].get("split") != "train"}


def grounding_table(runs: dict[str, str], records: str, features: str) -> str:
    """Markdown: held-out grounding of each run next to the category-prior baseline, and QA
    exact match over the relational and over the attribute question types, each as one
    group."""
    import numpy as np

    from llm3d_jax import tokens
    from llm3d_jax.evaluate import grounding_metrics
    from llm3d_jax.evaluate.answers import exact_match

    prior = category_prior_boxes(records, features)
    columns: dict[str, dict[str, float]] = {}
    with open(records, encoding="utf-8") as f:
        types = {r["id"]: r["meta"].get("qtype", "") for r in map(json.loads, f)}

    def exact_match_of(rows, qtypes) -> float:
        group = [r for r in rows if r["task"] == "qa" and types.get(r["id"]) in qtypes]
        return 100.0 * np.mean([exact_match(r["prediction"], r["answers"]) for r in group])

    for name, workdir in runs.items():
        with open(os.path.join(workdir, "eval", "predictions.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        ground = [r for r in rows if r["task"] == "grounding"]
        gt = np.asarray([tokens.parse_boxes(r["answers"][0])[0] for r in ground])
        pred = [r["boxes"][0] if r["boxes"] else None for r in ground]
        columns[name] = {
            **grounding_metrics(pred, gt),
            "answers without a box (%)": 100.0 * sum(p is None for p in pred) / max(len(pred), 1),
            "relational QA EM": exact_match_of(rows, RELATIONAL),
            "attribute QA EM": exact_match_of(rows, ATTRIBUTE_QUESTIONS),
            "n": len(ground),
        }
    ids = [r["id"] for r in ground]
    gt = np.asarray([tokens.parse_boxes(r["answers"][0])[0] for r in ground])
    columns["category prior"] = {**grounding_metrics([prior.get(i) for i in ids], gt)}
    names = list(columns)
    lines = [
        f"| held-out grounding ({len(ids)} questions) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    grounding = ("Acc@0.25", "Acc@0.5", "mIoU", "answers without a box (%)")
    for key in (*grounding, "relational QA EM", "attribute QA EM"):
        cells = [f"{columns[n][key]:.1f}" if key in columns[n] else "-" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qa_by_type(runs: dict[str, str], records: str) -> str:
    """Markdown: QA exact match per question type (the records' `meta.qtype`), runs side by side.
    Shows where the 3D input helps: the blind model can only learn each type's answer prior."""
    from llm3d_jax.evaluate.answers import em_by_question_type

    with open(records, encoding="utf-8") as f:
        types = {r["id"]: r["meta"].get("qtype", r["task"]) for r in map(json.loads, f)}
    columns, preds = {}, {}
    for name, workdir in runs.items():
        preds, refs = {}, {}
        with open(os.path.join(workdir, "eval", "predictions.jsonl"), encoding="utf-8") as f:
            for row in map(json.loads, f):
                if row["task"] == "qa":
                    preds[row["id"]], refs[row["id"]] = row["prediction"], row["answers"]
        columns[name] = em_by_question_type(preds, refs, types)
    counts = collections.Counter(types[key] for key in preds)  # every run has the same records
    lines = [
        "| QA question type | n | " + " | ".join(runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for qtype in sorted(counts):
        cells = [f"{columns[name][f'EM/{qtype}']:.1f}" for name in runs]
        lines.append(f"| {qtype} | {counts[qtype]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_data(
    out: str,
    num_scenes: int,
    seed: int,
    encoder: str,
    val_fraction: float = 0.25,
    tokenizer: str | None = None,
) -> dict[str, str]:
    """Stages 1-5: scenes -> renders -> fusion features (`encoder`: a tools/train_encoder.py ViT,
    on masked crops) -> offline language -> tokenizer (trained on the records unless `tokenizer`
    is given) -> TFDS, each skipped when done. -> the paths {scenes, features, records,
    tokenizer, tfds}. Also the data of tools/pretrain_demo.py."""
    paths = {
        "scenes": f"{out}/scenes",
        "features": f"{out}/features",
        "records": f"{out}/language.jsonl",
        "tokenizer": tokenizer or f"{out}/tokenizer",
        "tfds": f"{out}/tfds",
    }
    scenes = paths["scenes"]
    banner(f"1/9 synthetic scenes ({num_scenes})")
    run(
        [
            PY,
            "-m",
            "data_pipeline.scenes.synthetic",
            "--num-scenes",
            str(num_scenes),
            "--seed",
            str(seed),
            "--out",
            scenes,
        ],
        f"{scenes}/synth_{num_scenes - 1:04d}.npz",
    )

    banner("2/9 multi-view renders + contact sheets")
    run(
        [
            PY,
            "-m",
            "data_pipeline.render",
            "--scenes",
            scenes,
            "--out",
            f"{scenes}/views",
            "--views",
            "8",
            "--seed",
            str(seed),
        ],
        f"{scenes}/views/synth_{num_scenes - 1:04d}.png",
    )

    banner(f"3/9 pixel-aligned features lifted by fusion ({encoder})")
    run(
        [
            PY,
            "-m",
            "data_pipeline.features",
            "--scenes",
            scenes,
            "--method",
            "fusion",
            "--encoder",
            encoder,
            "--masked-crops",  # as tools/train_encoder.py crops what it learns from
            "--max-points",
            "1024",
            "--balance",
            "--out",
            paths["features"],
        ]
    )

    banner("4/9 offline language data for every task")
    run(
        [
            PY,
            "-m",
            "data_pipeline.language",
            "--scenes",
            scenes,
            "--backend",
            "offline",
            "--val-fraction",
            str(val_fraction),
            "--seed",
            str(seed),
            "--out",
            paths["records"],
        ],
        paths["records"],
    )

    banner("5/9 tokenizer + TFDS")
    if tokenizer:
        print(f"tokenizer: {os.path.relpath(tokenizer)}")
    elif not os.path.exists(f"{paths['tokenizer']}/tokenizer.json"):
        train_tokenizer(paths["records"], paths["tokenizer"])
    build_tfds(paths["features"], paths["records"], paths["tfds"])
    return paths


def build_tfds(features: str, records: str, tfds_dir: str) -> None:
    """python -m data_pipeline.tfds of these feature files and records; skipped when built."""
    run(
        [PY, "-m", "data_pipeline.tfds", "--features", features, "--language", records]
        + ["--out", tfds_dir],
        f"{tfds_dir}/build_report.synthetic.json",
    )


def train_and_eval(
    workdir: str,
    data: dict[str, str],
    seed: int,
    blind: bool,
    steps: int | None = None,
    pretrained: str = "",
    extra: tuple[str, ...] = (),
) -> None:
    """experiments/train.py with the demo config and `extra` overrides (+ experiments/eval.py
    on the held-out scenes)."""
    overrides = [
        f"--config.data_dir={data['tfds']}",
        f"--config.tokenizer={data['tokenizer']}",
        f"--config.seed={seed}",
        *extra,
    ]
    if steps:
        overrides.append(f"--config.total_steps={steps}")
    if pretrained:
        overrides.append(f"--config.model.pretrained={pretrained}")
    if blind:
        overrides.append("--config.data.blind=True")
    run(
        [
            PY,
            "experiments/train.py",
            "--config",
            "experiments/configs/demo.py",
            "--workdir",
            workdir,
            *overrides,
        ]
    )
    run(
        [PY, "experiments/eval.py", "--workdir", workdir, "--split", "validation"],
        f"{workdir}/eval/metrics.json",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--scenes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    start = time.time()
    # The pretrained models' tokenizer (pretrain_demo trained it on its rooms' records).
    data = build_data(out, args.scenes, args.seed, ENCODER, tokenizer=PRETRAINED["3d"])
    records, features = data["records"], data["features"]

    runs = {"3D-LLM": f"{out}/run_3d", "blind (no 3D input)": f"{out}/run_blind"}
    for i, (name, workdir) in enumerate(runs.items()):
        banner(f"{6 + i}/9 train: {name}")
        blind = "blind" in name
        pretrained = PRETRAINED["blind" if blind else "3d"]
        train_and_eval(workdir, data, args.seed, blind, args.steps, pretrained)

    banner("8/9 export, ask, pictures")
    model = f"{out}/model"
    run(
        [PY, "tools/export.py", "--workdir", runs["3D-LLM"], "--out", model], f"{model}/config.json"
    )
    predictions = f"{runs['3D-LLM']}/eval/predictions.jsonl"
    right, wrong = right_and_wrong(predictions)
    shown = {right["id"], wrong["id"]}
    question = next(r for r in held_out_records(records, "grounding") if r["id"] not in shown)
    run(
        [
            PY,
            "tools/ask.py",
            "--model",
            model,
            "--scene",
            f"{features}/{question['scene_id']}.npz",
            "--task",
            "grounding",
            question["prompt"],
            "--png",
            f"{out}/ask.png",
        ]
    )
    print(f"expected: {question['answers'][0]}")
    run(
        [
            PY,
            "tools/visualize.py",
            "--scene",
            f"{features}/{right['scene_id']}.npz",
            "--out",
            f"{out}/boxes.png",
            "--predictions",
            predictions,
            "--id",
            right["id"],
            "--id",
            wrong["id"],
        ]
    )
    plot_losses(runs, f"{out}/loss_curves.png")

    banner(f"9/9 held-out scenes: 3D-LLM vs blind baseline ({time.time() - start:.0f} s in all)")
    text = table(runs) + "\n\n" + grounding_table(runs, records, features)
    text += "\n\nQA exact match per question type:\n\n" + qa_by_type(runs, records)
    text += (
        "\n\nWhat the point features carry (tools/probe_features.py: a linear read-out of each "
        "object's mean feature, fitted on the training scenes):\n\n"
        + feature_probe.markdown(feature_probe.probe_features(features, data["scenes"], records))
    )
    print(text)
    with open(f"{out}/results.md", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(
        f"\noutputs in {os.path.relpath(out)}/: scenes/views/*.png (renders), boxes.png, "
        "loss_curves.png, run_*/eval/metrics.md, model/ (exported), results.md"
    )


if __name__ == "__main__":
    main()
