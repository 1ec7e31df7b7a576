"""Scene feature files: scenes -> views -> pixel-aligned 2D features -> 3D points -> 256^3 grid.

    python -m data_pipeline.features --scenes SCENES --method direct|fusion|neural_field \\
        --encoder random-vit|random-vit:D|vit:DIR|blip2:DIR|clip:DIR --out FEATURES

For each SCENES/<scene_id>.npz it uses SCENES/views/<scene_id>.npz when present (else renders
`--views` views at `--width` x `--height`), computes ConceptFusion pixel features (masks from the
instance renders, or from `--masks DIR/<scene_id>.npz`, format in data_pipeline/features2d.py),
lifts them with the chosen method, voxelises onto the scene's 256^3 grid and writes
FEATURES/<scene_id>.npz (the scene feature file of docs/reference.md) atomically.
A scene that fails is reported and skipped (exit status 1 at the end); an output that already
exists and is valid for the same method and encoder is kept (resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from data_pipeline import features2d
from data_pipeline.lift import LiftedPoints, validate_views
from data_pipeline.lift.direct import lift_direct
from data_pipeline.lift.fusion import lift_fusion
from data_pipeline.lift.neural_field import FieldConfig, lift_neural_field
from data_pipeline.lift.voxelize import grid_for_bounds, voxelize
from data_pipeline.render import Views, render_scene
from data_pipeline.scenes import Scene
from llm3d_jax import loading
from llm3d_jax.fileio import (
    InputError,
    child_path,
    cli_main,
    load_npz,
    output_folder,
    save_npz_atomic,
    write_bytes_atomic,
    writing,
)
from llm3d_jax.model import vit

FORMAT_VERSION = 1
METHODS = ("direct", "fusion", "neural_field")
FEATURE_KEYS = (
    "points",
    "features",
    "voxels",
    "grid_origin",
    "grid_voxel",
    "colors",
    "instance",
    "object_ids",
    "object_labels",
    "object_boxes",
    "meta",
)


def load_encoder(spec: str):
    """`random-vit`, `random-vit:D` (tiny random tower of width D, default 64), `vit:DIR` (a ViT
    written by `loading.save_trained_vit`, e.g. tools/train_encoder.py), `blip2:DIR`, `clip:DIR` ->
    (module, params)."""
    kind, _, arg = spec.partition(":")
    if kind == "random-vit":
        try:
            dim = int(arg) if arg else 64
        except ValueError:
            raise InputError(
                None, f"--encoder {spec}: width after random-vit: must be an integer"
            ) from None
        if dim < 4 or dim % 4:
            raise InputError(None, f"--encoder {spec}: width must be a positive multiple of 4")
        return vit.random_vit(dim)
    if kind == "vit" and arg:
        return loading.load_trained_vit(arg)
    if kind in ("blip2", "clip") and arg:
        return loading.load_vit(arg, kind=kind)
    raise InputError(
        None, f"--encoder {spec!r}: expected random-vit[:D], vit:DIR, blip2:DIR or clip:DIR"
    )


def scene_features(
    scene: Scene,
    views: Views,
    method: str,
    module,
    params,
    masks: list[np.ndarray] | None = None,
    max_points: int | None = None,
    balance: bool = False,
    field_config: FieldConfig = FieldConfig(),
    where: str | None = None,
    masked_crops: bool = False,
) -> dict[str, np.ndarray]:
    """The arrays of one scene feature file (meta not included)."""
    where = where or scene.scene_id
    validate_views(views, where, need_depth=method != "neural_field")
    if masks is None:
        rgb_only = method == "neural_field"  # the field never reads depth
        masks = features2d.instance_masks(views.instance, None if rgb_only else views.depth)
    pixels = features2d.pixel_features(module, params, views.rgb, masks, masked=masked_crops)
    if not (pixels.mask_ids >= 0).any():
        raise InputError(where, "no pixel is covered by a mask (nothing to lift)")
    lo, hi = scene.vertices.min(axis=0), scene.vertices.max(axis=0)
    if method == "direct":
        lifted: LiftedPoints = lift_direct(views, pixels, (lo, hi))
    elif method == "fusion":
        lifted = lift_fusion(views, pixels, (lo, hi))
    elif method == "neural_field":
        lifted, _ = lift_neural_field(views, pixels, (lo, hi), field_config)
    else:
        raise ValueError(f"unknown method {method!r}")
    if len(lifted) == 0:
        raise InputError(where, f"{method} produced no points")
    origin, voxel = grid_for_bounds(
        np.minimum(lo, lifted.points.min(axis=0)), np.maximum(hi, lifted.points.max(axis=0))
    )
    out = voxelize(lifted, origin, voxel, max_points=max_points, balance=balance)
    out["object_ids"] = np.array([o.id for o in scene.objects], np.int32)
    out["object_labels"] = np.array([o.label for o in scene.objects], dtype=np.str_)
    out["object_boxes"] = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 6)
    return out


def preview_png(arrays: dict[str, np.ndarray], title: str) -> bytes:
    """Top-down views of a feature file: point colours, and the features' first 3 principal
    components as RGB (points of one object should share a hue)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = arrays["points"]
    feats = arrays["features"].astype(np.float32)
    centred = feats - feats.mean(axis=0)
    _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 5000)], full_matrices=False)
    pcs = centred @ vt[:3].T
    lo, hi = np.percentile(pcs, 2, axis=0), np.percentile(pcs, 98, axis=0)
    pca_rgb = np.clip((pcs - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    if pca_rgb.shape[1] < 3:
        pca_rgb = np.pad(pca_rgb, ((0, 0), (0, 3 - pca_rgb.shape[1])))
    order = np.argsort(points[:, 2])  # draw low points first, so the top-down view shows tops
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=80)
    for ax, colours, name in (
        (axes[0], arrays["colors"] / 255.0, "colour"),
        (axes[1], pca_rgb, "feature PCA"),
    ):
        ax.scatter(points[order, 0], points[order, 1], c=colours[order], s=1, linewidths=0)
        ax.set_aspect("equal")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def is_valid_output(path: str, settings: dict) -> bool:
    """True when `path` is a complete feature file whose meta holds these settings (method,
    encoder, sampling)."""
    if not os.path.exists(path):
        return False
    try:
        data = load_npz(path, required=FEATURE_KEYS)
        meta = json.loads(str(data["meta"]))
    except (InputError, json.JSONDecodeError):
        return False
    n = len(data["points"])
    return (
        all(meta.get(key) == value for key, value in settings.items())
        and data["features"].shape[0] == n
        and data["voxels"].shape == (n, 3)
        and n > 0
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """How feature files are made: the options of this command (and of the Beam build,
    data_pipeline/tfds/beam.py, which computes features for the scenes its records name)."""

    method: str
    encoder: str
    masks: str | None = None  # folder of <scene_id>.npz mask files; None: instance masks
    views: int = 8  # views rendered when SCENES/views/<scene_id>.npz does not exist
    width: int = 320
    height: int = 240
    render_seed: int = 0
    max_points: int | None = None
    balance: bool = False
    masked_crops: bool = False
    preview: bool = False

    def recorded(self) -> dict:
        """What a file's meta records; a rerun keeps only files made with the same."""
        return {
            "method": self.method,
            "encoder": self.encoder,
            "max_points": self.max_points,
            "balance": self.balance,
            "masked_crops": self.masked_crops,
        }


def add_settings_arguments(parser: argparse.ArgumentParser, render_seed: str = "--seed") -> None:
    """The feature options, shared with data_pipeline/tfds/beam.py (where `--seed` is the split's
    seed, so the render seed is named `render_seed` there)."""
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument(
        "--encoder", required=True, help="random-vit[:D] | vit:DIR | blip2:DIR | clip:DIR"
    )
    parser.add_argument("--masks", help="folder of <scene_id>.npz mask files (default: instances)")
    parser.add_argument("--views", type=int, default=8, help="views to render when none exist")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument(
        render_seed, dest="render_seed", type=int, default=0, help="seed of rendered cameras"
    )
    parser.add_argument("--max-points", type=int, help="cap on voxelised points per scene")
    parser.add_argument(
        "--balance",
        action="store_true",
        help="under --max-points, an equal share of points per object (background as one)",
    )
    parser.add_argument(
        "--masked-crops",
        action="store_true",
        help="crop each mask's box with the other pixels painted out (what tools/train_encoder "
        "trains on; default: the plain box, as ConceptFusion)",
    )
    parser.add_argument(
        "--preview", action="store_true", help="also write FEATURES/<scene_id>.png (top-down views)"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.views < 1 or args.width < 8 or args.height < 8:
        raise InputError(None, "--views must be >= 1 and --width/--height >= 8")
    if args.balance and not args.max_points:
        raise InputError(None, "--balance shares out --max-points: give --max-points N too")
    return Settings(
        method=args.method,
        encoder=args.encoder,
        masks=args.masks,
        views=args.views,
        width=args.width,
        height=args.height,
        render_seed=args.render_seed,
        max_points=args.max_points,
        balance=args.balance,
        masked_crops=args.masked_crops,
        preview=args.preview,
    )


def _load_or_render(scene: Scene, views_dir: str, settings: Settings) -> tuple[Views, str]:
    path = child_path(views_dir, scene.scene_id, ".npz")
    if os.path.exists(path):
        return Views.load(path), path
    views = render_scene(
        scene, settings.views, settings.width, settings.height, settings.render_seed
    )
    return views, f"{scene.scene_id} (rendered views)"


def write_feature_file(scene_path: str, out_path: str, settings: Settings, module, params) -> int:
    """Computes the feature file of the scene file at `scene_path` (its views taken from the
    `views` folder beside it when there) and writes it to `out_path` atomically; -> its number
    of points. A bad scene, views or mask file is an InputError naming it."""
    scene = Scene.load(scene_path)
    out_dir = os.path.dirname(out_path)
    views, where = _load_or_render(
        scene, os.path.join(os.path.dirname(scene_path), "views"), settings
    )
    masks = None
    if settings.masks:
        mask_path = child_path(settings.masks, scene.scene_id, ".npz")
        masks = features2d.load_mask_file(mask_path, views.depth.shape)
    arrays = scene_features(
        scene,
        views,
        settings.method,
        module,
        params,
        masks,
        settings.max_points,
        settings.balance,
        where=where,
        masked_crops=settings.masked_crops,
    )
    meta = {
        "scene_id": scene.scene_id,
        "source": scene.meta.get("source", "unknown"),
        **settings.recorded(),
        "dim": int(arrays["features"].shape[1]),
        "num_views": int(len(views.depth)),
        "format_version": FORMAT_VERSION,
    }
    if "level" in scene.meta:  # "object": a scene file holding one object
        meta["level"] = scene.meta["level"]
    with writing(out_dir):
        save_npz_atomic(out_path, **arrays, meta=np.array(json.dumps(meta)))
        if settings.preview:
            title = f"{scene.scene_id}: {settings.method}, {settings.encoder}, {len(arrays['points'])} points"
            png = preview_png(arrays, title)
            write_bytes_atomic(child_path(out_dir, scene.scene_id, ".png"), png)
    return len(arrays["points"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", required=True, help="folder of <scene_id>.npz scene files")
    parser.add_argument("--out", required=True, help="folder for <scene_id>.npz feature files")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.scenes):
        raise InputError(args.scenes, "scene folder not found")
    paths = sorted(glob.glob(os.path.join(args.scenes, "*.npz")))
    if not paths:
        raise InputError(args.scenes, "no .npz scene files")
    settings = settings_from_args(args)
    output_folder(args.out)  # before the encoder loads: a bad --out fails in a second
    module, params = load_encoder(args.encoder)
    failed, skipped = [], 0
    bar = tqdm(paths, desc=f"features ({args.method})", unit="scene")
    for path in bar:
        scene_id = os.path.splitext(os.path.basename(path))[0]
        out_path = child_path(args.out, scene_id, ".npz")
        if is_valid_output(out_path, settings.recorded()):
            skipped += 1
            continue
        try:
            start = time.perf_counter()
            points = write_feature_file(path, out_path, settings, module, params)
            bar.set_postfix(points=points, s=f"{time.perf_counter() - start:.1f}")
        except InputError as err:
            tqdm.write(f"error: {err}", file=sys.stderr)
            failed.append(scene_id)
    done = len(paths) - len(failed) - skipped
    print(
        f"{done} written, {skipped} already done, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f" -> {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main)
