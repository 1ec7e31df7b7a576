"""Language records for 3D scenes: generate them (four procedures, offline or against a server) or
import a public dataset.

  python -m data_pipeline.language --scenes SCENES --out RECORDS.jsonl
        [--procedure offline|boxes_demo|chatcaptioner|revision] [--backend offline|openai]
  python -m data_pipeline.language --import scanqa|sqa3d|scanrefer|3dllm|3dmv_vqa|objaverse
        --input FILE [--annotations FILE] [--scene-map FILE] [--scenes SCENES] --out RECORDS.jsonl

Procedures: `offline` (the default with --backend offline) writes template records for every
task, true of the scene by construction; `boxes_demo` (the default with --backend openai),
`chatcaptioner` and `revision` are 3D-LLM's prompting procedures, run against an
OpenAI-compatible server (--backend openai: --base-url, --model, key from $OPENAI_API_KEY or
--api-key-env) or the deterministic template "LLM" (--backend offline).

Outputs: RECORDS.jsonl (one record a line; `meta.split` is "train" or "val", whole scenes go to
val, --val-fraction of them), RECORDS.stats.json (counts per task, source, split, question type;
answer lengths) and RECORDS.lengths.png (answer-length histogram). Records are deduplicated by
id (generated ids hash the content).

Resume: each finished scene is appended to RECORDS.jsonl.partial; rerunning the same command
skips those scenes, and with --backend openai every finished request is cached on disk
(--cache-dir, default RECORDS.jsonl.cache), so a rerun after a crash or after failed requests
costs only what never finished. Scenes whose requests failed are reported, left out of the
output and retried by the next run (exit status 1); unreadable scene files are reported and
skipped (exit status 0).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys

from tqdm import tqdm

from data_pipeline.language import boxes_demo, chatcaptioner, importers, offline, revision
from data_pipeline.language.openai_client import ChatClient, ChatConfig, OfflineChat
from data_pipeline.language.records import TASKS, read_records, validate_record
from data_pipeline.language.stats import write_report
from llm3d_jax.fileio import (
    InputError,
    child_path,
    cli_main,
    output_folder,
    write_jsonl_atomic,
    writing,
)

PROCEDURES = ("offline", "boxes_demo", "chatcaptioner", "revision")
IMPORTS = ("scanqa", "sqa3d", "scanrefer", "3dllm", "3dmv_vqa", "objaverse")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="records file (.jsonl)")
    p.add_argument("--scenes", help="folder of scene files <scene_id>.npz")
    p.add_argument(
        "--procedure",
        choices=PROCEDURES,
        help="default: offline, or boxes_demo with --backend openai",
    )
    p.add_argument("--backend", choices=("offline", "openai"), default="offline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of scenes in the val split (generation)",
    )
    p.add_argument(
        "--tasks", help=f"comma list for offline / boxes_demo (default all): {','.join(TASKS)}"
    )
    g = p.add_argument_group("procedures")
    g.add_argument(
        "--temperatures", default="0.2,0.6,1.0", help="boxes_demo: one pass per temperature"
    )
    g.add_argument(
        "--views", help="chatcaptioner: folder of <scene_id>.npz views (default: render them)"
    )
    g.add_argument(
        "--num-views", type=int, default=4, help="chatcaptioner: views asked about per scene"
    )
    g.add_argument("--rounds", type=int, default=3, help="chatcaptioner: questions per view")
    g.add_argument(
        "--to-task",
        default="qa",
        choices=sorted({t for _, t in revision.REWRITES}),
        help="revision: task to rewrite into",
    )
    g.add_argument(
        "--input",
        help="revision: records to rewrite (default: each scene's template captions); import: the "
        "dataset file (objaverse: also a folder of ChatCaptioner <uid>.json files)",
    )
    g = p.add_argument_group("OpenAI-compatible server (--backend openai)")
    g.add_argument("--base-url", default=ChatConfig.base_url)
    g.add_argument("--model", default=ChatConfig.model)
    g.add_argument("--vision-model", help="chatcaptioner answerer (default: --model)")
    g.add_argument(
        "--api-key-env", default=ChatConfig.api_key_env, help="environment variable holding the key"
    )
    g.add_argument("--cache-dir", help="response cache (default: OUT.cache)")
    g.add_argument("--concurrency", type=int, default=ChatConfig.concurrency)
    g.add_argument(
        "--timeout", type=float, default=ChatConfig.timeout_s, help="seconds per request"
    )
    g.add_argument("--max-retries", type=int, default=ChatConfig.max_retries)
    g.add_argument(
        "--backoff",
        type=float,
        default=ChatConfig.backoff_s,
        help="seconds before the first retry (doubles)",
    )
    g.add_argument(
        "--json-mode", action="store_true", help="ask the server for response_format json_object"
    )
    g = p.add_argument_group("importers")
    g.add_argument(
        "--import",
        dest="dataset",
        choices=IMPORTS,
        help="import a public dataset instead of generating",
    )
    g.add_argument(
        "--annotations", help="sqa3d: the annotations file joined with --input (questions)"
    )
    g.add_argument("--scene-map", help="3dllm: JSON map between integer scene ids and ScanNet ids")
    g.add_argument(
        "--task", default="qa", choices=TASKS, help="3dllm: task of the imported records"
    )
    g.add_argument(
        "--split",
        default="train",
        choices=("train", "val"),
        help="import: meta.split of every imported record",
    )
    args = p.parse_args(argv)
    check_numbers(args)
    if not args.out.endswith(".jsonl"):
        raise InputError(args.out, "--out must name a .jsonl file")
    if not 0.0 <= args.val_fraction < 1.0:
        raise InputError(None, f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if os.path.isdir(args.out):
        raise InputError(args.out, "--out is a folder; name the records file (.jsonl)")
    return args


def parse_temperatures(text: str) -> tuple[float, ...]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(None, f"--temperatures: {part.strip()!r} is not a number") from None
        if not 0.0 <= value <= 2.0:
            raise InputError(None, f"--temperatures must be in [0, 2], got {part.strip()}")
        values.append(value)
    return tuple(values)


def check_numbers(args) -> None:
    """One-line errors for numbers no run can use (negative timeouts, no attempts, ...)."""
    # `not x > 0` also refuses NaN.
    if not args.timeout > 0 or args.timeout == float("inf"):
        raise InputError(None, f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.max_retries < 0:
        raise InputError(None, f"--max-retries must be >= 0, got {args.max_retries}")
    if args.concurrency < 1:
        raise InputError(None, f"--concurrency must be >= 1, got {args.concurrency}")
    if not args.backoff >= 0:
        raise InputError(None, f"--backoff must be >= 0 seconds, got {args.backoff}")
    if args.num_views < 1:
        raise InputError(None, f"--num-views must be >= 1, got {args.num_views}")
    if args.rounds < 1:
        raise InputError(None, f"--rounds must be >= 1, got {args.rounds}")
    args.temperature_values = parse_temperatures(args.temperatures)


def out_paths(out: str) -> dict[str, str]:
    stem = out[: -len(".jsonl")]
    return {
        "stats": stem + ".stats.json",
        "png": stem + ".lengths.png",
        "partial": out + ".partial",
    }


def scene_files(directory: str | None) -> dict[str, str]:
    if directory is None:
        return {}
    if not os.path.isdir(directory):
        raise InputError(directory, "--scenes is not a folder")
    return {
        os.path.basename(p)[: -len(".npz")]: p
        for p in sorted(glob.glob(os.path.join(directory, "*.npz")))
    }


def load_scene(path: str):
    from data_pipeline.scenes import Scene

    scene = Scene.load(path)
    # Records name their scene by its id and are joined with `<scene_id>.npz` downstream.
    name = os.path.basename(path)[: -len(".npz")]
    if scene.scene_id != name:
        raise InputError(path, f"meta.scene_id {scene.scene_id!r} differs from the file name")
    return scene


def assign_splits(records: list[dict], val_fraction: float, seed: int) -> None:
    """Whole scenes to "val": the round(fraction * scenes) scenes first in a seeded hash order."""
    scenes = sorted(
        {r["scene_id"] for r in records},
        key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest(),
    )
    n_val = round(val_fraction * len(scenes))
    if val_fraction > 0 and len(scenes) >= 2:
        n_val = min(max(n_val, 1), len(scenes) - 1)
    val = set(scenes[:n_val])
    for r in records:
        r["meta"]["split"] = "val" if r["scene_id"] in val else "train"


def dedupe(records: list[dict]) -> tuple[list[dict], int]:
    seen, out = set(), []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out, len(records) - len(out)


# ------------------------------------------------------------------------------ per-scene work


def make_chat(args, respond, model: str | None = None):
    if args.backend == "offline":
        return OfflineChat(respond)
    config = ChatConfig(
        base_url=args.base_url,
        model=model or args.model,
        api_key_env=args.api_key_env,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        backoff_s=args.backoff,
        concurrency=args.concurrency,
        cache_dir=args.cache_dir or args.out + ".cache",
        json_mode=args.json_mode,
    )
    return ChatClient(config)


def make_worker(args, tasks: tuple[str, ...], sources: dict[str, list[dict]] | None):
    """(scene_id, scene path or None) -> (records, failures) for the chosen procedure."""
    if args.procedure == "offline":
        return lambda sid, path: (offline.generate(load_scene(path), args.seed, tasks), [])
    if args.procedure == "boxes_demo":
        chat = make_chat(args, boxes_demo.offline_respond)
        temps = args.temperature_values
        btasks = (
            tuple(t for t in tasks if t in boxes_demo.TASKS) if args.tasks else boxes_demo.TASKS
        )
        return lambda sid, path: boxes_demo.records_for_scene(load_scene(path), chat, btasks, temps)
    if args.procedure == "chatcaptioner":
        questioner = make_chat(args, chatcaptioner.offline_respond)
        vision = None if args.backend == "offline" else make_chat(args, None, args.vision_model)

        def caption(sid, path):
            from data_pipeline.render import Views, render_scene

            scene = load_scene(path)
            if args.views:
                views = Views.load(child_path(args.views, sid, ".npz"))
            else:
                views = render_scene(scene, num_views=args.num_views, seed=args.seed)
            if vision is None:
                answerer = chatcaptioner.offline_answerer(views, scene)
            else:
                answerer = chatcaptioner.http_answerer(vision, views)
            return chatcaptioner.records_for_scene(
                scene, views, questioner, answerer, args.rounds, args.num_views
            )

        return caption
    chat = make_chat(args, revision.offline_respond)

    def revise(sid, path):
        if sources is not None:
            src = sources.get(sid, [])
        else:
            src = offline.generate(load_scene(path), args.seed, ("caption", "dense_caption"))
        return revision.revise(src, chat, args.to_task)

    return revise


def revision_sources(path: str) -> dict[str, list[dict]]:
    """scene id -> its records in the --input file of the revision procedure (bad lines reported)."""
    records, problems = read_records(path)
    for problem in problems:
        print(f"warning: {path}: {problem}", file=sys.stderr)
    sources: dict[str, list[dict]] = {}
    for r in records:
        sources.setdefault(r["scene_id"], []).append(r)
    return sources


# ------------------------------------------------------------------------------ resume file


def read_partial(path: str, fingerprint: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """(records of finished scenes, finished scene -> its reported problems) from the resume file."""
    if not os.path.exists(path):
        return [], {}
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    records, done, pending = [], {}, []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the crash: everything after the last finished scene is redone
        if n == 0:
            if row.get("_run") != fingerprint:
                raise InputError(
                    path,
                    f"was written by a run with other options {row.get('_run')}; delete it or rerun those options",
                )
            continue
        if "_done" in row:
            done[row["_done"]] = row.get("_problems", [])
            records += pending
            pending = []
        else:
            pending.append(row)
    return records, done


def write_partial_header(path: str, fingerprint: dict, records: list[dict], done: dict) -> None:
    """Rewrites the resume file with only finished scenes (drops a crashed scene's tail)."""
    rows = [{"_run": fingerprint}]
    by_scene: dict[str, list[dict]] = {}
    for r in records:
        by_scene.setdefault(r["scene_id"], []).append(r)
    for sid, problems in done.items():
        rows += by_scene.get(sid, []) + [{"_done": sid, "_problems": problems}]
    write_jsonl_atomic(path, rows)


def generate(args) -> int:
    scenes = scene_files(args.scenes)
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else TASKS
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(None, f"--tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    if args.tasks and args.procedure in ("chatcaptioner", "revision"):
        raise InputError(
            None, f"--tasks is for offline and boxes_demo; {args.procedure} makes its own tasks"
        )
    if args.tasks and args.procedure == "boxes_demo":
        cannot = [t for t in tasks if t not in boxes_demo.TASKS]
        if cannot:  # never silently swapped for other tasks
            raise InputError(
                None,
                f"--tasks: boxes_demo does not make {cannot[0]!r} "
                f"(it makes {', '.join(boxes_demo.TASKS)})",
            )
    sources = revision_sources(args.input) if args.procedure == "revision" and args.input else None
    if sources is not None and not scenes:
        scenes = dict.fromkeys(sorted(sources))
    worker = make_worker(args, tasks, sources)
    if not scenes:
        raise InputError(
            args.scenes, "no scene files (*.npz) found" if args.scenes else "--scenes is required"
        )
    paths = out_paths(args.out)
    fingerprint = {
        k: getattr(args, k)
        for k in (
            "procedure",
            "backend",
            "seed",
            "tasks",
            "temperatures",
            "to_task",
            "input",
            "model",
            "base_url",
            "views",
            "num_views",
            "rounds",
        )
    }
    records, done = read_partial(paths["partial"], fingerprint)
    with writing(paths["partial"]):
        write_partial_header(paths["partial"], fingerprint, records, done)
    todo = [sid for sid in scenes if sid not in done]
    incomplete, skipped = {}, {sid: p for sid, p in done.items() if p}
    bar = tqdm(
        todo,
        desc=f"{args.procedure} ({args.backend})",
        unit="scene",
        initial=len(done),
        total=len(scenes),
    )
    with writing(paths["partial"]), open(paths["partial"], "a", encoding="utf-8") as partial:
        for sid in bar:
            try:
                new, failures = worker(sid, scenes[sid])
            except InputError as err:  # a bad scene file: report, mark done, go on
                new, failures, skipped[sid] = [], [], [str(err)]
                print(f"warning: skipped {err}", file=sys.stderr)
            if failures:  # not marked done: the next run retries it (finished requests are cached)
                incomplete[sid] = failures
                continue
            rows = new + [{"_done": sid, "_problems": skipped.get(sid, [])}]
            partial.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            partial.flush()
            os.fsync(partial.fileno())
            records += new
            bar.set_postfix(records=len(records))
    known = set(scenes)
    for r in records:
        validate_record(r, known)
    records, duplicates = dedupe(records)
    assign_splits(records, args.val_fraction, args.seed)
    extra = {
        "duplicates_dropped": duplicates,
        "skipped_scenes": skipped,
        "incomplete_scenes": {sid: f[:5] for sid, f in incomplete.items()},
    }
    stats = write_report(records, args.out, paths["stats"], paths["png"], extra)
    print(
        f"wrote {len(records)} records of {stats['scenes']} scenes to {args.out} ({duplicates} duplicates dropped)"
    )
    print(json.dumps(stats["per_task"]))
    if incomplete:
        for sid, failures in incomplete.items():
            print(
                f"warning: {sid}: {failures[0]} ({len(failures)} failed requests)", file=sys.stderr
            )
        print(
            f"error: {len(incomplete)} scenes incomplete; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    os.remove(paths["partial"])
    return 0


def import_dataset(args) -> int:
    if not args.input:
        raise InputError(None, f"--import {args.dataset} needs --input")
    scenes = scene_files(args.scenes)
    known = set(scenes) or None
    if args.dataset == "scanqa":
        records, problems = importers.import_scanqa(args.input, known)
    elif args.dataset == "sqa3d":
        if not args.annotations:
            raise InputError(None, "--import sqa3d needs --annotations")
        records, problems = importers.import_sqa3d(args.input, args.annotations, known)
    elif args.dataset == "scanrefer":
        if not scenes:
            raise InputError(
                args.scenes,
                "--import scanrefer needs --scenes with the scene files (for the boxes)",
            )

        def scene_of(sid):
            if sid not in scenes:
                raise InputError(child_path(args.scenes, sid, ".npz", args.input), "file not found")
            return load_scene(scenes[sid])

        records, problems = importers.import_scanrefer(args.input, scene_of, known)
    elif args.dataset == "3dmv_vqa":
        records, problems = importers.import_3dmv_vqa(args.input, known)
    elif args.dataset == "objaverse":
        records, problems = importers.import_objaverse_captions(args.input, known)
    else:
        if not args.scene_map:
            raise InputError(None, "--import 3dllm needs --scene-map")
        records, problems = importers.import_3dllm(args.input, args.scene_map, args.task, known)
    for problem in problems[:20]:
        print(f"warning: {args.input}: {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(
            f"warning: {args.input}: {len(problems) - 20} more problems (see the stats file)",
            file=sys.stderr,
        )
    records, duplicates = dedupe(records)
    for r in records:
        r["meta"]["split"] = args.split
    paths = out_paths(args.out)
    extra = {
        "duplicates_dropped": duplicates,
        "problems": len(problems),
        "first_problems": problems[:100],
    }
    write_report(records, args.out, paths["stats"], paths["png"], extra)
    print(
        f"imported {len(records)} {args.dataset} records to {args.out} ({len(problems)} entries skipped)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_folder(os.path.dirname(args.out) or ".", "the folder of --out")
    if args.dataset:
        return import_dataset(args)
    args.procedure = args.procedure or ("offline" if args.backend == "offline" else "boxes_demo")
    if args.procedure == "offline" and args.backend == "openai":
        raise InputError(
            None,
            "--procedure offline uses no LLM; drop --backend openai or pick a prompting procedure",
        )
    return generate(args)


if __name__ == "__main__":
    cli_main(main)
