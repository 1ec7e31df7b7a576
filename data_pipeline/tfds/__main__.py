"""python -m data_pipeline.tfds --features FEATURES --language RECORDS.jsonl --out TFDS_DIR

Writes TFDS_DIR/llm3d_scenes/<config>/<version> and TFDS_DIR/llm3d_language/<config>/<version>
(ArrayRecord, readable with `tfds.data_source`) and TFDS_DIR/build_report.<config>.json; prints
the counts, the rejection reasons and the bytes on disk. Bad items are skipped and reported.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.tfds.build import build
from data_pipeline.tfds.builders import CONFIGS
from llm3d_jax.fileio import cli_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.tfds", description=__doc__)
    parser.add_argument("--features", required=True, help="folder of <scene_id>.npz feature files")
    parser.add_argument("--language", required=True, help="language records, JSONL")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write")
    parser.add_argument("--config", default="synthetic", choices=sorted(CONFIGS))
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of scenes in validation, by seeded hash (records with meta.split keep theirs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split hash")
    parser.add_argument(
        "--max-points",
        type=int,
        default=0,
        help="store at most this many points per scene (seeded subsample); 0 keeps all",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
    args = parser.parse_args()
    report = build(
        args.features,
        args.language,
        args.out,
        config_name=args.config,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_points=args.max_points,
        overwrite=args.overwrite,
    )
    for rejected in report["rejected_scenes"][:20]:  # each bad feature file, named
        print(f"warning: {rejected['file']}: {rejected['reason']}", file=sys.stderr)
    if len(report["rejected_scenes"]) > 20:
        print(
            f"warning: {len(report['rejected_scenes']) - 20} more rejected scenes (see the report)",
            file=sys.stderr,
        )
    counts, size = report["counts"], report["bytes"]
    print(
        f"built {args.config}: scenes {counts['scenes']}, records {counts['records']}, dim {counts['dim']}"
    )
    print(
        f"rejected: {counts['rejected_scenes']} scenes, {counts['rejected_records']} records "
        f"{report['rejected_reasons'] or ''}"
    )
    print(
        f"bytes: scenes {size['scenes_on_disk']}, language {size['language_on_disk']}; per scene "
        f"{size['per_scene_on_disk']:.0f} on disk ({size['per_scene_serialized']:.0f} serialized) "
        f"vs {size['per_scene_raw_npz']:.0f} raw npz"
    )
    print(f"report: {args.out}/build_report.{args.config}.json")
    return 0


if __name__ == "__main__":
    cli_main(main)
