"""Visual-grounding metrics: axis-aligned 3D IoU, Acc@0.25, Acc@0.5 and mean IoU (x100)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm3d_jax import tokens


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes.

    a, b: [..., 6] as xmin ymin zmin xmax ymax zmax (broadcastable) -> [...]. A box with a
    non-positive extent has volume 0; a NaN box, or an empty union, gives IoU 0.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    lo = np.maximum(a[..., :3], b[..., :3])
    hi = np.minimum(a[..., 3:], b[..., 3:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
    vol_a = np.prod(np.clip(a[..., 3:] - a[..., :3], 0.0, None), axis=-1)
    vol_b = np.prod(np.clip(b[..., 3:] - b[..., :3], 0.0, None), axis=-1)
    union = vol_a + vol_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.nan_to_num(iou, nan=0.0)


def stack_boxes(boxes: Sequence[Sequence[float] | None] | np.ndarray) -> np.ndarray:
    """A list of boxes (None = no prediction) -> float64 [N,6] with NaN rows for None."""
    if isinstance(boxes, np.ndarray):
        out = boxes.astype(np.float64)
    else:
        out = np.full((len(boxes), 6), np.nan)
        for i, box in enumerate(boxes):
            if box is not None:
                out[i] = np.asarray(box, np.float64)
    if out.ndim != 2 or out.shape[1] != 6:
        raise ValueError(f"boxes must have shape [N,6], got {out.shape}")
    return out


def grounding_metrics(pred_boxes, gt_boxes) -> dict[str, float]:
    """Acc@0.25, Acc@0.5 (share of samples with IoU >= threshold) and mIoU, all x100.

    pred_boxes: [N,6] array or a list of boxes, where None or a NaN row is a missing prediction
    (IoU 0). gt_boxes: [N,6].
    """
    pred = stack_boxes(pred_boxes)
    gt = stack_boxes(gt_boxes)
    if len(pred) != len(gt):
        raise ValueError(f"{len(pred)} predicted boxes for {len(gt)} ground-truth boxes")
    if len(gt) == 0:
        raise ValueError("grounding_metrics needs at least one sample")
    iou = box_iou(pred, gt)
    return {
        "Acc@0.25": 100.0 * float(np.mean(iou >= 0.25)),
        "Acc@0.5": 100.0 * float(np.mean(iou >= 0.5)),
        "mIoU": 100.0 * float(np.mean(iou)),
    }


def answer_iou(row: dict) -> float | None:
    """IoU of a prediction row's first box with its reference answer's first box (None when the
    reference has no box; 0 when the prediction has none)."""
    try:
        reference = tokens.parse_boxes(row.get("answers", [""])[0])
    except ValueError:
        return None
    if not len(reference):
        return None
    predicted = row.get("boxes") or []
    if not predicted:
        return 0.0
    return float(box_iou(np.asarray(predicted[0], np.float64), reference[0]))
