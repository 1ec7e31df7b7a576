"""Navigation metrics: how close the last predicted waypoint comes to the goal (metres)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def navigation_metrics(
    pred_paths: Sequence[np.ndarray | None], gt_paths: Sequence[np.ndarray], radius: float = 0.5
) -> dict[str, float]:
    """Goal error and success of predicted waypoint paths.

    pred_paths[i]: [K,3] predicted `<pt>` waypoints in metres (None or empty: no path);
    gt_paths[i]: [M,3] reference waypoints, the last one the goal.
    -> `Success@{radius}m` (x100: share whose last waypoint lies within `radius` of the goal; a
    missing path fails) and `goal_error_m` (mean distance over the rows that have a path; NaN if
    none does).
    """
    if len(pred_paths) != len(gt_paths):
        raise ValueError(f"{len(pred_paths)} predicted paths for {len(gt_paths)} references")
    errors = np.full(len(gt_paths), np.inf)
    for i, (pred, gt) in enumerate(zip(pred_paths, gt_paths, strict=True)):
        gt = np.asarray(gt, np.float64).reshape(-1, 3)
        if pred is None or len(pred) == 0 or len(gt) == 0:
            continue
        last = np.asarray(pred, np.float64).reshape(-1, 3)[-1]
        errors[i] = float(np.linalg.norm(last - gt[-1]))
    found = np.isfinite(errors)
    return {
        f"Success@{radius:g}m": 100.0 * float(np.mean(errors <= radius)) if len(errors) else 0.0,
        "goal_error_m": float(errors[found].mean()) if found.any() else float("nan"),
    }
