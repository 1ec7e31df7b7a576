"""Validates scene feature files + language records and writes the two TFDS datasets.

`build()` reads every language record (JSONL, docs/architecture.md contract), gives each a split
(its own `meta.split` when the language stage set one, else by a seeded hash of its scene id, so
all of a scene's records share a split), reads each referenced scene feature file once, and
rejects bad items with a reason instead of stopping:

  scene:  unreadable file or missing keys, NaN/Inf points or features, voxels that are not
          integers in 0..255, feature width differing from the dataset's (the first good
          scene's width), inconsistent shapes, no points, bad grid
  record: invalid UTF-8 or JSON or fields, a scene id that is not a plain file name, empty
          answers, unknown task, source not in the config, duplicate id, missing scene file,
          rejected scene, malformed location placeholder

The report (counts, every rejection with its reason, bytes on disk per scene against the raw
npz) is returned, written to TFDS_DIR/build_report.<config>.json and summarised on stdout.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from data_pipeline.tfds.builders import CONFIGS, TASKS, Llm3dLanguage, Llm3dScenes
from llm3d_jax import tokens
from llm3d_jax.data.sources import LANGUAGE_DATASET, SCENE_DATASET
from llm3d_jax.fileio import (
    InputError,
    child_path,
    load_npz,
    name_problem,
    output_folder,
    write_text_atomic,
)

SPLITS = ("train", "validation")
_SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation"}
SCENE_KEYS = (
    "points",
    "features",
    "voxels",
    "grid_origin",
    "grid_voxel",
    "instance",
    "object_ids",
    "object_labels",
    "object_boxes",
    "meta",
)


@dataclass
class Report:
    config: str
    rejected_scenes: list[dict] = field(default_factory=list)  # {scene_id, reason}
    rejected_records: list[dict] = field(default_factory=list)  # {id, line, reason}
    counts: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)

    def reject_scene(self, scene_id: str, reason: str, file: str | None = None) -> None:
        self.rejected_scenes.append({"scene_id": scene_id, "reason": reason, "file": file})

    def reject_record(self, record_id, line: int, reason: str) -> None:
        self.rejected_records.append({"id": record_id, "line": line, "reason": reason})

    def as_dict(self) -> dict:
        reasons = Counter(r["reason"].split(":")[0] for r in self.rejected_records)
        reasons.update("scene " + r["reason"].split(":")[0] for r in self.rejected_scenes)
        return {
            "config": self.config,
            "counts": self.counts,
            "rejected_reasons": dict(sorted(reasons.items())),
            "rejected_scenes": self.rejected_scenes,
            "rejected_records": self.rejected_records,
            "bytes": self.bytes,
        }


def add_split_arguments(parser) -> None:
    """The options both build commands (python -m data_pipeline.tfds and its Beam form) share:
    the records, the output, the config and the split."""
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


def split_by_hash(scene_id: str, val_fraction: float, seed: int) -> str:
    """ "validation" for a seeded-hash share `val_fraction` of scene ids, else "train"."""
    digest = hashlib.sha256(f"{seed}:{scene_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


def _check_record(raw: dict, config) -> str | None:
    """The reason a record is malformed, or None. Location placeholders are checked later."""
    for key in ("id", "scene_id", "task", "prompt"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            return f"bad field: {key!r} must be a non-empty string"
    if name_problem(raw["scene_id"]):  # it names a file in the features folder
        return f"bad scene id: {raw['scene_id']!r:.80} {name_problem(raw['scene_id'])}"
    if raw["task"] not in TASKS:
        return f"unknown task: {raw['task']!r}"
    answers = raw.get("answers")
    if not isinstance(answers, list) or not answers:
        return "empty answers: 'answers' must be a non-empty list"
    if not all(isinstance(a, str) and a.strip() for a in answers):
        return "empty answers: every answer must be a non-empty string"
    ids = raw.get("object_ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        return "bad field: 'object_ids' must be a list of ints"
    if not isinstance(raw.get("meta", {}), dict):
        return "bad field: 'meta' must be an object"
    source = raw.get("source", "")
    if config.sources and source not in config.sources:
        return f"wrong source: {source!r} not in config {config.name} {list(config.sources)}"
    return None


def read_records(path: str, config, val_fraction: float, seed: int, report: Report) -> list[dict]:
    """Valid-looking records with their `split`, in file order; rejects the rest into `report`."""
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    records, seen = [], set()
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for line_no, line in enumerate(tqdm(lines, desc="records", unit="rec"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:  # one bad line, not a bad file
            report.reject_record(None, line_no, f"invalid UTF-8: {err.reason} at byte {err.start}")
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            report.reject_record(None, line_no, f"invalid JSON: {err.msg}")
            continue
        if not isinstance(raw, dict):
            report.reject_record(None, line_no, "invalid JSON: a line must be an object")
            continue
        reason = _check_record(raw, config)
        if reason is None and raw["id"] in seen:
            reason = f"duplicate id: {raw['id']!r}"
        given = raw.get("meta", {}).get("split") if reason is None else None
        if given is not None and given not in _SPLIT_NAMES:
            reason = f"bad split: meta.split {given!r} is not train/val/validation"
        if reason:
            report.reject_record(raw.get("id"), line_no, reason)
            continue
        seen.add(raw["id"])
        split = _SPLIT_NAMES[given] if given else split_by_hash(raw["scene_id"], val_fraction, seed)
        records.append({**raw, "line": line_no, "split": split})
    return records


def scene_example(path: str, scene_id: str, dim: int | None, max_points: int) -> dict:
    """The TFDS scene example of one feature file; InputError(path, reason) when it is bad."""
    data = load_npz(path, required=SCENE_KEYS)
    points = np.asarray(data["points"])
    features = np.asarray(data["features"])
    n = len(points)

    def bad(problem: str):
        return InputError(path, problem)

    if points.ndim != 2 or points.shape[1] != 3 or n == 0:
        raise bad(f"points must be [N>0,3], got {list(points.shape)}")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise bad(
            f"features must be a float [N,D] array, got {features.dtype} {list(features.shape)}"
        )
    if dim is not None and features.shape[1] != dim:
        raise bad(f"wrong feature width: {features.shape[1]} (dataset has {dim})")
    for key, shape in (("voxels", (n, 3)), ("instance", (n,)), ("colors", (n, 3))):
        if key in data and data[key].shape != shape:
            raise bad(f"{key} has shape {list(data[key].shape)}, expected {list(shape)}")
    if features.shape[0] != n:
        raise bad(f"features has shape {list(features.shape)}, expected {n} rows to match points")
    if not np.all(np.isfinite(points)):
        raise bad("NaN/Inf in points")
    features16 = features.astype(np.float16)
    if not np.all(np.isfinite(features16)):
        raise bad("NaN/Inf in features")
    voxels = np.asarray(data["voxels"])
    if voxels.dtype.kind == "f":
        if not np.all(np.isfinite(voxels)):
            raise bad("NaN/Inf in voxels")
        if np.any(voxels != np.round(voxels)):
            raise bad("voxels must be integers")
    elif voxels.dtype.kind not in "iu":
        raise bad(f"voxels must be integers, got {voxels.dtype}")
    if voxels.min() < 0 or voxels.max() > 255:
        raise bad("voxels outside 0..255")
    origin = np.asarray(data["grid_origin"], np.float32).reshape(-1)
    voxel = np.asarray(data["grid_voxel"], np.float32)
    if origin.shape != (3,) or voxel.size != 1 or not np.all(np.isfinite(origin)):
        raise bad("bad grid: grid_origin must be 3 finite numbers, grid_voxel one number")
    if not (np.isfinite(voxel.reshape(())) and voxel.reshape(()) > 0):
        raise bad(f"bad grid: grid_voxel {float(voxel.reshape(()))} must be > 0")
    ids = np.asarray(data["object_ids"])
    if ids.dtype.kind not in "iu":
        raise bad(f"object_ids must be integers, got {ids.dtype}")
    boxes = np.asarray(data["object_boxes"], np.float32)
    labels = np.asarray(data["object_labels"])
    m = len(ids)
    if boxes.shape != (m, 6) or labels.shape != (m,) or not np.all(np.isfinite(boxes)):
        raise bad(f"objects: {m} ids, boxes {list(boxes.shape)}, labels {list(labels.shape)}")

    keep = slice(None)
    if max_points and n > max_points:
        # Seeded by the scene id, so rebuilding gives the same points.
        seed = int.from_bytes(hashlib.sha256(scene_id.encode()).digest()[:8], "big")
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    colors = data.get("colors", np.zeros((0, 3), np.uint8))
    return {
        "points": points.astype(np.float32)[keep],
        "features": features16[keep],
        "voxels": voxels.astype(np.uint8)[keep],
        "colors": colors.astype(np.uint8)[keep] if len(colors) else colors.astype(np.uint8),
        "instance": np.asarray(data["instance"], np.int32)[keep],
        "grid_origin": origin,
        "grid_voxel": voxel.reshape(()),
        "object_ids": ids.astype(np.int32),
        "object_labels": [str(v) for v in labels],
        "object_boxes": boxes,
        "meta": str(data["meta"]),
    }


def keyed_scene_example(row: tuple[int, str, str], dim: int) -> tuple[int, dict]:
    """(key, scene_id, feature file path) -> (key, the TFDS scene example of the file)."""
    key, scene_id, path = row
    return key, {"scene_id": scene_id, **scene_example(path, scene_id, dim, 0)}


def feature_width(paths: list[str]) -> int | None:
    """The width D of the first readable feature file: the dataset's width."""
    for path in paths:
        try:
            features = load_npz(path).get("features")
        except InputError:
            continue
        if features is not None and features.ndim == 2:
            return int(features.shape[1])
    return None


def no_records(report: Report) -> str:
    if not report.rejected_records:
        return "no valid records (the file holds none)"
    first = report.rejected_records[0]
    return f"no valid records ({len(report.rejected_records)} rejected, e.g. line {first['line']}: {first['reason']})"


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _write_failure(err: BaseException) -> str | None:
    """The reason when `err` is a failed write (full disk, quota, file-size limit), else None."""
    if isinstance(err, OSError):
        return str(err.strerror or err)
    # ArrayRecord's C++ writer reports a failed write(2) as a RuntimeError.
    if isinstance(err, RuntimeError):
        found = re.search(r"write\(\) failed: ([^;]+)", str(err))
        if found:
            return found.group(1)
    return None


def _remove_partial_build(targets: list[str], new_dirs: list[str]) -> None:
    """Removes what a failed build left: the version folders, TFDS's `incomplete.*` folders
    next to them, and the dataset folders the build created."""
    for target in targets:
        shutil.rmtree(target, ignore_errors=True)
        parent, version = os.path.split(target)
        for left in glob.glob(os.path.join(parent, f"incomplete.*_{version}")):
            shutil.rmtree(left, ignore_errors=True)
    for folder in new_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def check_arguments(config_name: str, val_fraction: float, records_path: str) -> None:
    if config_name not in CONFIGS:
        raise InputError(None, f"unknown config {config_name!r}; choose from {sorted(CONFIGS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(None, f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not os.path.isfile(records_path):
        raise InputError(records_path, "file not found")


def prepare_output(out_dir: str, config_name: str, overwrite: bool) -> list[str]:
    """-> the two dataset folders a build writes; an existing build is removed when
    `overwrite`, else an error. Called after every other check, before any work."""
    output_folder(out_dir)
    version = str(CONFIGS[config_name].version)
    targets = [
        os.path.join(out_dir, d, config_name, version) for d in (SCENE_DATASET, LANGUAGE_DATASET)
    ]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not overwrite:
        raise InputError(existing[0], "already built; pass --overwrite to rebuild")
    for target in existing:
        shutil.rmtree(target)
    return targets


def wanted_scenes(
    records: list[dict], scene_dir: str, records_path: str, report: Report
) -> tuple[list[dict], dict[str, set[str]]]:
    """The records whose scene file `scene_dir/<scene_id>.npz` exists (the others are rejected
    into `report`) and the scene ids each split needs."""
    wanted: dict[str, set[str]] = {s: set() for s in SPLITS}
    kept = []
    for r in records:
        if not os.path.isfile(child_path(scene_dir, r["scene_id"], ".npz", records_path)):
            report.reject_record(r["id"], r["line"], f"missing scene: {r['scene_id']}.npz")
            continue
        wanted[r["split"]].add(r["scene_id"])
        kept.append(r)
    if not kept:
        raise InputError(records_path, no_records(report))
    return kept, wanted


def join_records(
    records: list[dict],
    wanted: dict[str, set[str]],
    grids: dict[str, tuple[np.ndarray, np.ndarray]],
    report: Report,
) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """-> (the scene ids stored in each split, in key order; the language examples of each
    split). `grids` holds (grid_origin, grid_voxel) of every accepted scene; a scene not in it
    was rejected (its reason is in `report`), and so are its records."""
    scene_rows = {s: sorted(i for i in wanted[s] if i in grids) for s in SPLITS}
    scene_index = {s: {i: k for k, i in enumerate(rows)} for s, rows in scene_rows.items()}
    bad_scenes = {r["scene_id"]: r["reason"] for r in report.rejected_scenes}
    language: dict[str, list] = {s: [] for s in SPLITS}
    for r in records:
        if r["scene_id"] in bad_scenes:
            report.reject_record(r["id"], r["line"], f"scene rejected: {bad_scenes[r['scene_id']]}")
            continue
        origin, voxel = grids[r["scene_id"]]
        try:
            for text in [r["prompt"], *r["answers"]]:
                tokens.placeholders_to_tokens(text, origin, voxel)
        except ValueError as err:
            report.reject_record(r["id"], r["line"], f"bad location placeholder: {err}")
            continue
        split = r["split"]
        language[split].append(
            {
                "id": r["id"],
                "scene_id": r["scene_id"],
                "scene_index": scene_index[split][r["scene_id"]],
                "task": r["task"],
                "prompt": r["prompt"],
                "answers": list(r["answers"]),
                "object_ids": np.asarray(r.get("object_ids", []), np.int32),
                "source": r.get("source", ""),
                "meta": json.dumps(r.get("meta", {}), sort_keys=True),
            }
        )
    return scene_rows, language


def write_datasets(
    out_dir: str,
    config_name: str,
    scene_splits: dict,
    language: dict[str, list[dict]],
    metadata: dict,
    targets: list[str],
    download_config: tfds.download.DownloadConfig | None = None,
) -> list[str]:
    """Writes llm3d_scenes/<config> from `scene_splits` ({split: iterable of (key, example), or
    a beam.PTransform yielding them, written on Beam with `download_config`'s options}) and then
    llm3d_language/<config> from `language` in this process. On failure nothing is left.
    -> the dataset folders it created (what `finish_report` removes if the report fails)."""
    # Dataset folders this build creates, removed with the pair when it fails (no partial output).
    new_dirs = [
        d
        for d in (os.path.join(out_dir, SCENE_DATASET), os.path.join(out_dir, LANGUAGE_DATASET))
        if not os.path.exists(d)
    ]
    language_splits = {s: enumerate(language[s]) for s in scene_splits}
    with tempfile.TemporaryDirectory() as download_dir:
        try:
            for cls, splits, config in (
                (Llm3dScenes, scene_splits, download_config),
                (Llm3dLanguage, language_splits, None),
            ):
                builder = cls(
                    splits=splits, metadata=metadata, config=config_name, data_dir=out_dir
                )
                builder.download_and_prepare(download_dir=download_dir, download_config=config)
        except BaseException as err:
            _remove_partial_build(targets, new_dirs)
            problem = _write_failure(err)
            if problem:  # a full disk, a quota: one line, not a traceback
                raise InputError(out_dir, f"cannot write ({problem})") from None
            raise
    return new_dirs


def finish_report(
    report: Report,
    out_dir: str,
    targets: list[str],
    new_dirs: list[str],
    scene_rows: dict[str, list[str]],
    language: dict[str, list[dict]],
    raw_bytes: int,
    dim: int,
) -> dict:
    """Counts and bytes of a written build into `report`, written to
    out_dir/build_report.<config>.json; -> the report as a dict."""
    splits = [s for s in SPLITS if language[s]]
    n_scenes = sum(len(rows) for rows in scene_rows.values())
    scene_bytes, language_bytes = _dir_bytes(targets[0]), _dir_bytes(targets[1])
    # ArrayRecord files grow in 128 KiB blocks, so small builds are dominated by padding; the
    # serialized record bytes are the per-scene cost at scale.
    scene_info = tfds.builder_from_directory(targets[0]).info
    serialized = sum(scene_info.splits[s].num_bytes for s in splits)
    report.counts = {
        **report.counts,
        "scenes": {s: len(scene_rows[s]) for s in splits},
        "records": {s: len(language[s]) for s in splits},
        "rejected_scenes": len(report.rejected_scenes),
        "rejected_records": len(report.rejected_records),
        "dim": dim,
    }
    report.bytes = {
        "scenes_on_disk": scene_bytes,
        "language_on_disk": language_bytes,
        "raw_npz": raw_bytes,
        "per_scene_on_disk": scene_bytes / max(n_scenes, 1),
        "per_scene_serialized": serialized / max(n_scenes, 1),
        "per_scene_raw_npz": raw_bytes / max(n_scenes, 1),
    }
    result = report.as_dict()
    report_path = os.path.join(out_dir, f"build_report.{report.config}.json")
    try:
        write_text_atomic(report_path, json.dumps(result, indent=1))
    except OSError as err:  # the datasets without their report are not a finished build
        _remove_partial_build(targets, new_dirs)
        raise InputError(report_path, f"cannot write ({err.strerror or err})") from None
    return result


def build(
    features_dir: str,
    records_path: str,
    out_dir: str,
    config_name: str = "synthetic",
    val_fraction: float = 0.1,
    seed: int = 0,
    max_points: int = 0,
    overwrite: bool = False,
) -> dict:
    """Builds llm3d_scenes/<config> and llm3d_language/<config> under `out_dir`; returns the report."""
    check_arguments(config_name, val_fraction, records_path)
    if not os.path.isdir(features_dir):
        raise InputError(features_dir, "not a directory")
    if max_points < 0:
        raise InputError(None, f"--max-points must be >= 0, got {max_points}")
    targets = prepare_output(out_dir, config_name, overwrite)
    config = CONFIGS[config_name]
    report = Report(config=config_name)
    records = read_records(records_path, config, val_fraction, seed, report)
    records, wanted = wanted_scenes(records, features_dir, records_path, report)
    all_ids = sorted(set().union(*wanted.values()))
    paths = {s: child_path(features_dir, s, ".npz", records_path) for s in all_ids}
    dim = feature_width([paths[s] for s in all_ids])
    if dim is None:
        raise InputError(features_dir, "no readable scene feature file referenced by the records")

    # Each referenced scene file is read and checked once; good ones are kept for writing.
    examples: dict[str, dict] = {}
    for scene_id in tqdm(all_ids, desc="scenes", unit="scene"):
        try:
            examples[scene_id] = {
                "scene_id": scene_id,
                **scene_example(paths[scene_id], scene_id, dim, max_points),
            }
        except InputError as err:
            report.reject_scene(scene_id, err.problem, paths[scene_id])
    grids = {i: (e["grid_origin"], e["grid_voxel"]) for i, e in examples.items()}
    scene_rows, language = join_records(records, wanted, grids, report)
    splits = [s for s in SPLITS if language[s]]
    if not splits:
        raise InputError(records_path, no_records(report))

    def scene_stream(split):
        for key, scene_id in enumerate(scene_rows[split]):
            yield key, examples[scene_id]

    metadata = {
        "dim": dim,
        "max_points": max_points,
        "seed": seed,
        "val_fraction": val_fraction,
        "prompt_templates": dict(config.prompt_templates),
    }
    new_dirs = write_datasets(
        out_dir, config_name, {s: scene_stream(s) for s in splits}, language, metadata, targets
    )
    raw_bytes = sum(os.path.getsize(paths[i]) for rows in scene_rows.values() for i in rows)
    return finish_report(report, out_dir, targets, new_dirs, scene_rows, language, raw_bytes, dim)


def print_report(report: dict, out_dir: str) -> None:
    """The build's summary on stdout; each rejected scene file named on stderr (20 at most)."""
    for rejected in report["rejected_scenes"][:20]:
        print(f"warning: {rejected['file']}: {rejected['reason']}", file=sys.stderr)
    if len(report["rejected_scenes"]) > 20:
        print(
            f"warning: {len(report['rejected_scenes']) - 20} more rejected scenes (see the report)",
            file=sys.stderr,
        )
    counts, size, config = report["counts"], report["bytes"], report["config"]
    print(
        f"built {config}: scenes {counts['scenes']}, records {counts['records']}, dim {counts['dim']}"
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
    print(f"report: {out_dir}/build_report.{config}.json")
