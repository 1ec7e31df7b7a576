"""Scene files -> feature files -> TFDS datasets on Apache Beam: many processes, or many machines.

    python -m data_pipeline.tfds.beam --scenes SCENES --method fusion --encoder ENCODER \\
        --features FEATURES --language RECORDS.jsonl --out TFDS_DIR \\
        --beam_pipeline_options=direct_num_workers=2,direct_running_mode=multi_processing

writes what `python -m data_pipeline.features` followed by `python -m data_pipeline.tfds` write
(the same records, field by field), for the scenes the records name, in three steps:

1. Beam pipeline: each scene on a worker. Its feature file FEATURES/<scene_id>.npz is made (kept
   when one made with the same settings exists, as `data_pipeline.features` resumes) and checked
   as `data_pipeline.tfds` checks it; one small outcome per scene (width, grid, or why rejected)
   comes back to this process.
2. Beam pipeline, TFDS's own (`DownloadConfig(beam_options=...)`, the splits as PTransforms): the
   accepted files read and encoded on workers, written in key order into ArrayRecord shards of
   llm3d_scenes/<config>.
3. This process: llm3d_language/<config> from the records (text: cheap), each joined to its
   scene's row of step 2, then TFDS_DIR/build_report.<config>.json.

Two pipelines, not one, because TFDS fixes a dataset's features (the width D of the point
features) and its splits' contents before its pipeline starts, and both are known only once the
feature files are made and checked: step 1 finds them out, step 2 writes with them.

`--beam_pipeline_options` takes Beam's options without their `--`, comma-separated (as
`tfds build` does): the default runs the DirectRunner in this process; Dataflow, Flink or Spark
are a `runner=...` and that runner's options (docs/user-guide.md, step 5). Every worker must
see SCENES, FEATURES, TFDS_DIR and the encoder directory at the same paths (a shared file
system) and have this package installed.

A scene whose feature file cannot be made, or is rejected, is reported and skipped, its records
rejected, the rest built. The exit status is 1 when a feature file could not be made (as
`data_pipeline.features` exits), 0 when files were only rejected (as `data_pipeline.tfds` does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from data_pipeline import features
from data_pipeline.tfds.build import (
    SPLITS,
    Report,
    add_split_arguments,
    check_arguments,
    feature_width,
    finish_report,
    join_records,
    keyed_scene_example,
    no_records,
    prepare_output,
    print_report,
    read_records,
    scene_example,
    wanted_scenes,
    write_datasets,
)
from data_pipeline.tfds.builders import CONFIGS
from llm3d_jax.fileio import InputError, child_path, cli_main, output_folder, write_text_atomic


def pipeline_options(text: str) -> PipelineOptions:
    """`runner=DataflowRunner,project=P` -> PipelineOptions(["--runner=DataflowRunner",
    "--project=P"]). An option Beam does not know is an error (Beam itself would drop it with a
    warning). Workers log errors only unless `default_sdk_harness_log_level` is given: the
    DirectRunner's workers warn about their own set-up at every start."""
    flags = [f"--{option}" for option in text.split(",") if option]
    if not any(f.startswith("--default_sdk_harness_log_level") for f in flags):
        flags.append("--default_sdk_harness_log_level=ERROR")
    options = PipelineOptions(flags)
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise InputError(None, f"--beam_pipeline_options: unknown Beam option(s) {unknown}")
    return options


class Encoder:
    """The feature encoder's (module, params), loaded once per worker process and shared by its
    threads (Beam's `Shared`: a runner may run many threads per process, and BLIP-2's ViT-g
    takes 4 GB)."""

    def __init__(self, spec: str):
        self.module, self.params = features.load_encoder(spec)


class FeatureFiles(beam.DoFn):
    """scene id -> its feature file (made, or kept when valid for the settings), checked as the
    TFDS build checks it -> one outcome dict: `reason` when rejected, else `width` and the grid."""

    def __init__(self, scenes_dir: str, features_dir: str, settings: features.Settings):
        self.scenes_dir = scenes_dir
        self.features_dir = features_dir
        self.settings = settings
        self.shared = shared.Shared()
        self.encoder = None  # loaded by the first scene whose file is made, not when all are kept

    def process(self, scene_id: str):
        out_path = child_path(self.features_dir, scene_id, ".npz")
        outcome = {
            "scene_id": scene_id,
            "file": out_path,
            "width": None,
            "made": False,  # the file was made here
            "failed": False,  # it could not be made (`reason` says why)
        }
        try:
            if not features.is_valid_output(out_path, self.settings.recorded()):
                if self.encoder is None:
                    self.encoder = self.shared.acquire(lambda: Encoder(self.settings.encoder))
                start = time.perf_counter()
                scene_path = child_path(self.scenes_dir, scene_id, ".npz")
                points = features.write_feature_file(
                    scene_path, out_path, self.settings, self.encoder.module, self.encoder.params
                )
                outcome["made"] = True
                beam.metrics.Metrics.counter("llm3d", "feature_files_made").inc()
                # Progress: one line per scene made (a worker's log on Dataflow).
                seconds = time.perf_counter() - start
                print(
                    f"features: {scene_id}: {points} points, {seconds:.1f} s (pid {os.getpid()})",
                    file=sys.stderr,
                    flush=True,
                )
        except InputError as err:
            beam.metrics.Metrics.counter("llm3d", "scenes_failed").inc()
            yield {**outcome, "file": err.path or out_path, "reason": err.problem, "failed": True}
            return
        # The dataset's width is that of the first readable file (as data_pipeline.tfds rules),
        # so the width of a readable file is reported even when the file is rejected.
        outcome["width"] = feature_width([out_path])
        try:
            example = scene_example(out_path, scene_id, None, 0)
        except InputError as err:
            beam.metrics.Metrics.counter("llm3d", "scenes_rejected").inc()
            yield {**outcome, "reason": err.problem}
            return
        yield {
            **outcome,
            "grid_origin": example["grid_origin"].tolist(),  # float32 values, exact in JSON
            "grid_voxel": float(example["grid_voxel"]),
        }


def _write_outcomes(outcomes: list[dict], path: str) -> None:
    write_text_atomic(path, json.dumps(sorted(outcomes, key=lambda o: o["scene_id"])))


def make_feature_files(
    scene_ids: list[str],
    scenes_dir: str,
    features_dir: str,
    settings: features.Settings,
    options: PipelineOptions,
    work_dir: str,
) -> dict[str, dict]:
    """Step 1: runs the feature pipeline over `scene_ids`; -> {scene_id: outcome}. The outcomes
    travel through a file in `work_dir`, which every worker and this process can read."""
    path = os.path.join(work_dir, "outcomes.json")
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Scenes" >> beam.Create(scene_ids)
            | "Spread" >> beam.Reshuffle()  # one scene per work item, over all workers
            | "FeatureFiles" >> beam.ParDo(FeatureFiles(scenes_dir, features_dir, settings))
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_outcomes, path)
        )
    with open(path, encoding="utf-8") as f:
        return {o["scene_id"]: o for o in json.load(f)}


def scene_split(rows: list[tuple[int, str, str]], dim: int) -> beam.PTransform:
    """Step 2, one split: (key, scene_id, path) rows -> (key, scene example), read on workers.
    (`keyed_scene_example` lives in build.py so these workers import neither JAX nor open3d.)"""
    return beam.Create(rows) | beam.Reshuffle() | beam.Map(keyed_scene_example, dim=dim)


def build_beam(
    scenes_dir: str,
    features_dir: str,
    records_path: str,
    out_dir: str,
    settings: features.Settings,
    options: PipelineOptions,
    config_name: str = "synthetic",
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Makes the feature files of the scenes the records name and builds llm3d_scenes/<config>
    and llm3d_language/<config> under `out_dir`, on Beam; -> the report (`build`'s, with
    `counts.features`: files made, kept and failed)."""
    check_arguments(config_name, val_fraction, records_path)
    if not os.path.isdir(scenes_dir):
        raise InputError(scenes_dir, "scene folder not found")
    output_folder(features_dir, "--features")
    features.load_encoder(settings.encoder)  # a bad --encoder is one line here, not N on workers
    targets = prepare_output(out_dir, config_name, overwrite)
    config = CONFIGS[config_name]
    report = Report(config=config_name)
    records = read_records(records_path, config, val_fraction, seed, report)
    records, wanted = wanted_scenes(records, scenes_dir, records_path, report)
    all_ids = sorted(set().union(*wanted.values()))

    work_dir = tempfile.mkdtemp(prefix=".beam-", dir=out_dir)
    try:
        outcomes = make_feature_files(
            all_ids, scenes_dir, features_dir, settings, options, work_dir
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    dim = next((outcomes[i]["width"] for i in all_ids if outcomes[i]["width"] is not None), None)
    if dim is None:
        first = outcomes[all_ids[0]]
        raise InputError(first["file"], f"no scene gave a feature file, e.g.: {first['reason']}")
    grids = {}
    for scene_id in all_ids:  # in id order, as the single-process build rejects them
        outcome = outcomes[scene_id]
        if outcome.get("reason") is None and outcome["width"] != dim:
            outcome["reason"] = f"wrong feature width: {outcome['width']} (dataset has {dim})"
        if outcome.get("reason") is not None:
            report.reject_scene(scene_id, outcome["reason"], outcome["file"])
        else:
            grid_voxel = np.float32(outcome["grid_voxel"])
            grids[scene_id] = (np.asarray(outcome["grid_origin"], np.float32), grid_voxel)
    report.counts["features"] = {
        "made": sum(o["made"] for o in outcomes.values()),
        "kept": sum(not o["made"] and not o["failed"] for o in outcomes.values()),
        "failed": sum(o["failed"] for o in outcomes.values()),
    }

    scene_rows, language = join_records(records, wanted, grids, report)
    splits = [s for s in SPLITS if language[s]]
    if not splits:
        raise InputError(records_path, no_records(report))
    paths = {i: child_path(features_dir, i, ".npz") for i in all_ids}
    scene_splits = {
        s: scene_split([(k, i, paths[i]) for k, i in enumerate(scene_rows[s])], dim) for s in splits
    }
    metadata = {
        "dim": dim,
        "max_points": 0,
        "seed": seed,
        "val_fraction": val_fraction,
        "prompt_templates": dict(config.prompt_templates),
    }
    new_dirs = write_datasets(
        out_dir,
        config_name,
        scene_splits,
        language,
        metadata,
        targets,
        download_config=tfds.download.DownloadConfig(beam_options=options),
    )
    raw_bytes = sum(os.path.getsize(paths[i]) for rows in scene_rows.values() for i in rows)
    return finish_report(report, out_dir, targets, new_dirs, scene_rows, language, raw_bytes, dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.tfds.beam",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenes", required=True, help="folder of <scene_id>.npz scene files")
    parser.add_argument(
        "--features",
        required=True,
        help="folder of <scene_id>.npz feature files: made there, kept when made with these settings",
    )
    add_split_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
    parser.add_argument(
        "--beam_pipeline_options",
        default="",
        help="Beam options without '--', comma-separated, e.g. "
        "direct_num_workers=2,direct_running_mode=multi_processing or "
        "runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp",
    )
    features.add_settings_arguments(parser, render_seed="--render-seed")
    args = parser.parse_args(argv)
    report = build_beam(
        args.scenes,
        args.features,
        args.language,
        args.out,
        features.settings_from_args(args),
        pipeline_options(args.beam_pipeline_options),
        config_name=args.config,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    files = report["counts"]["features"]
    print(
        f"features: {files['made']} made, {files['kept']} already done, {files['failed']} failed "
        f"-> {args.features}"
    )
    print_report(report, args.out)
    return 1 if files["failed"] else 0


if __name__ == "__main__":
    cli_main(main)
