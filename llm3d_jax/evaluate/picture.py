"""Pictures of a scene with its boxes: a two-panel PNG (perspective, top-down) of a feature file's
points or a pipeline scene file's mesh, ground-truth boxes green, predicted boxes red
(matplotlib, headless). tools/visualize.py and tools/ask.py --png draw with it."""

from __future__ import annotations

import io
import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Line3DCollection, Poly3DCollection  # noqa: E402

from llm3d_jax.fileio import InputError, load_npz, write_bytes_atomic, writing  # noqa: E402

MAX_POINTS = 30000
MAX_FACES = 20000
# The 12 edges of a box as pairs of corner indices; corner c has x = bit 0, y = bit 1, z = bit 2.
_EDGES = [
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (0, 2),
    (1, 3),
    (4, 6),
    (5, 7),
    (0, 4),
    (1, 5),
    (2, 6),
    (3, 7),
]


def box_corners(box: np.ndarray) -> np.ndarray:
    """[6] xmin ymin zmin xmax ymax zmax -> [8,3] corners."""
    lo, hi = np.asarray(box[:3]), np.asarray(box[3:])
    return np.array([[(hi if (c >> a) & 1 else lo)[a] for a in range(3)] for c in range(8)])


def feature_colors(features: np.ndarray) -> np.ndarray:
    """[N,D] -> [N,3] in [0,1]: the first three principal components, each scaled to [0,1]."""
    x = features.astype(np.float32)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x[:: max(1, len(x) // 5000)], full_matrices=False)
    pcs = x @ vt[: min(3, len(vt))].T
    pcs = np.pad(pcs, ((0, 0), (0, 3 - pcs.shape[1])))
    lo, hi = np.percentile(pcs, 2, 0), np.percentile(pcs, 98, 0)
    return np.clip((pcs - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def load_scene(path: str) -> dict:
    """A feature file or a pipeline scene file -> dict(points or mesh, colours, objects)."""
    data = load_npz(path)
    objects = dict(
        ids=data.get("object_ids", np.zeros(0, np.int32)),
        labels=data.get("object_labels", np.zeros(0, str)),
        boxes=data.get("object_boxes", np.zeros((0, 6), np.float32)).reshape(-1, 6),
    )
    if "vertices" in data and "faces" in data:
        colors = data.get("colors")
        colors = np.full((len(data["vertices"]), 3), 0.6) if colors is None else colors / 255.0
        return dict(vertices=data["vertices"], faces=data["faces"], colors=colors, **objects)
    if "points" not in data:
        raise InputError(
            path, "neither a scene feature file (points) nor a scene file (vertices, faces)"
        )
    points = data["points"]
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(path, f"points must have shape [N,3], got {points.shape}")
    if "colors" in data:
        colors = data["colors"] / 255.0
    elif "features" in data:
        colors = feature_colors(data["features"])
    else:
        colors = np.full((len(points), 3), 0.5)
    return dict(points=points, colors=colors, **objects)


def _draw(ax, scene, gt_boxes, highlight, pred_boxes, rng, pred_labels=()):
    if "points" in scene:
        keep = np.arange(len(scene["points"]))
        if len(keep) > MAX_POINTS:
            keep = np.sort(rng.choice(len(keep), MAX_POINTS, replace=False))
        p = scene["points"][keep]
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=scene["colors"][keep], s=0.5, depthshade=False)
    else:
        faces = scene["faces"]
        if len(faces) > MAX_FACES:
            faces = faces[np.sort(rng.choice(len(faces), MAX_FACES, replace=False))]
        tris = scene["vertices"][faces]
        mesh = Poly3DCollection(tris, facecolors=scene["colors"][faces].mean(1), linewidths=0)
        ax.add_collection3d(mesh)
    for box, strong in [(b, False) for b in gt_boxes] + [(b, True) for b in highlight]:
        c = box_corners(box)
        ax.add_collection3d(
            Line3DCollection(
                [(c[i], c[j]) for i, j in _EDGES],
                colors="limegreen",
                linewidths=2.0 if strong else 0.6,
            )
        )
    for k, box in enumerate(pred_boxes):
        c = box_corners(box)
        ax.add_collection3d(
            Line3DCollection([(c[i], c[j]) for i, j in _EDGES], colors="red", linewidths=2.0)
        )
        if k < len(pred_labels) and pred_labels[k]:
            ax.text(*box[3:], pred_labels[k], color="red", fontsize=9, fontweight="bold")


def render(
    scene: dict, out: str, highlight_ids=(), pred_boxes=(), title: str = "", pred_labels=()
) -> None:
    """Writes a two-panel PNG (perspective, top-down) of the scene with its boxes; `pred_labels`
    (one string per predicted box, may be shorter) are written at the boxes' top corners."""
    rng = np.random.default_rng(0)
    ids = np.asarray(scene["ids"])
    strong = np.isin(ids, np.asarray(list(highlight_ids), ids.dtype if len(ids) else np.int32))
    gt, hi = scene["boxes"][~strong], scene["boxes"][strong]
    kept = [
        (np.asarray(b, np.float64), label)
        for b, label in itertools.zip_longest(pred_boxes, pred_labels, fillvalue="")
        if b is not None and len(b) == 6 and np.all(np.isfinite(b))
    ]
    pred = [b for b, _ in kept]
    labels = [label for _, label in kept]
    xyz = scene["points"] if "points" in scene else scene["vertices"]
    lo, up = xyz.min(0), xyz.max(0)
    fig = plt.figure(figsize=(12, 6))
    for k, (elev, azim, name) in enumerate([(30, -60, "perspective"), (90, -90, "top-down")]):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        _draw(ax, scene, gt, hi, pred, rng, labels)
        ax.set_xlim(lo[0], up[0]), ax.set_ylim(lo[1], up[1]), ax.set_zlim(lo[2], up[2])
        ax.set_box_aspect(np.maximum(up - lo, 1e-3))
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("x (m)"), ax.set_ylabel("y (m)")
        if name == "top-down":
            ax.set_zticks([])
        else:
            ax.set_zlabel("z (m)")
        for box, label in zip(scene["boxes"][strong], np.asarray(scene["labels"])[strong]):
            ax.text(
                *(box[:3] + box[3:]) / 2 + [0, 0, (box[5] - box[2]) / 2],
                str(label),
                color="darkgreen",
                fontsize=8,
            )
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, "green: ground truth (thick: target)   red: predicted", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    with writing(out):
        write_bytes_atomic(out, buffer.getvalue())
    plt.close(fig)
