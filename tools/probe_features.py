r"""Linear probe of lifted point features: how much of each object's category and colour a
linear read-out recovers on held-out scenes. A rough measure, before any training, of what the
3D input can tell a 3D-LLM: questions about an attribute the features hardly carry will not
beat the blind baseline by much, however long the model trains.

    python -m tools.probe_features --features FEATURES --scenes SCENES --records language.jsonl

FEATURES/<scene_id>.npz: `features` [N,D], `instance` [N] (object id per point, -1 background),
`object_ids` / `object_labels` (python -m data_pipeline.features writes these). Colour comes from
SCENES/<scene_id>.npz `object_ids` / `object_colors` when that file has them (synthetic scenes).
The held-out scenes are the ones whose records in --records have `meta.split` "val". The
probe is ridge regression onto one-hot classes from each object's mean feature, standardised on
the training scenes; `majority` is the held-out accuracy of always answering the training
scenes' commonest class.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.feature_probe import markdown, probe_features  # noqa: E402
from llm3d_jax.fileio import cli_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--features", required=True, help="folder of <scene_id>.npz features")
    parser.add_argument("--scenes", help="folder of <scene_id>.npz scenes (for colours)")
    parser.add_argument("--records", required=True, help="language records with splits")
    args = parser.parse_args()
    print(markdown(probe_features(args.features, args.scenes, args.records)))


if __name__ == "__main__":
    cli_main(main)
