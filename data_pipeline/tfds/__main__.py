"""python -m data_pipeline.tfds --features FEATURES --language RECORDS.jsonl --out TFDS_DIR

Writes TFDS_DIR/llm3d_scenes/<config>/<version> and TFDS_DIR/llm3d_language/<config>/<version>
(ArrayRecord, readable with `tfds.data_source`) and TFDS_DIR/build_report.<config>.json; prints
the counts, the rejection reasons and the bytes on disk. Bad items are skipped and reported.
"""

from __future__ import annotations

import argparse

from data_pipeline.tfds.build import add_split_arguments, build, print_report
from llm3d_jax.fileio import cli_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.tfds", description=__doc__)
    parser.add_argument("--features", required=True, help="folder of <scene_id>.npz feature files")
    add_split_arguments(parser)
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
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    cli_main(main)
