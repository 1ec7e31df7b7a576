import numpy as np
import pytest

from llm3d_jax.evaluate import box_iou, grounding_metrics


def test_box_iou_hand_computed():
    unit = [0, 0, 0, 1, 1, 1]
    assert box_iou(unit, unit) == pytest.approx(1.0)
    # Half-overlapping along x: inter 0.5, union 1.5.
    assert box_iou(unit, [0.5, 0, 0, 1.5, 1, 1]) == pytest.approx(1 / 3)
    # Touching faces and disjoint boxes: 0.
    assert box_iou(unit, [1, 0, 0, 2, 1, 1]) == 0.0
    assert box_iou(unit, [5, 5, 5, 6, 6, 6]) == 0.0
    # Box inside a box of 8x the volume.
    assert box_iou(unit, [0, 0, 0, 2, 2, 2]) == pytest.approx(1 / 8)
    # Degenerate (inverted / flat) boxes never divide by zero.
    assert box_iou([1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]) == 0.0
    assert box_iou([0, 0, 0, 1, 1, 0], unit) == 0.0
    # Broadcasting: [2,6] against [6].
    np.testing.assert_allclose(box_iou(np.array([unit, [0, 0, 0, 2, 2, 2]]), unit), [1, 1 / 8])


def test_grounding_metrics_hand_computed():
    gt = np.array([[0, 0, 0, 1, 1, 1]] * 5, np.float32)
    pred = [
        [0, 0, 0, 1, 1, 1],  # IoU 1
        [0.5, 0, 0, 1.5, 1, 1],  # IoU 1/3
        [0, 0, 0, 2, 2, 2],  # IoU 1/8
        None,  # missing: IoU 0
        [np.nan] * 6,  # missing: IoU 0
    ]
    out = grounding_metrics(pred, gt)
    assert out["Acc@0.25"] == pytest.approx(40.0)
    assert out["Acc@0.5"] == pytest.approx(20.0)
    assert out["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 8) / 5)
    # The same as an array with NaN rows.
    arr = np.array([p if p is not None else [np.nan] * 6 for p in pred], np.float64)
    assert grounding_metrics(arr, gt) == out


def test_grounding_metrics_threshold_is_inclusive():
    gt = np.array([[0, 0, 0, 1, 1, 1]], np.float64)
    pred = np.array([[0, 0, 0, 1, 1, 0.5]])  # IoU exactly 0.5
    out = grounding_metrics(pred, gt)
    assert out["Acc@0.5"] == 100.0 and out["Acc@0.25"] == 100.0


def test_grounding_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError, match="predicted boxes"):
        grounding_metrics(np.zeros((2, 6)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"\[N,6\]"):
        grounding_metrics(np.zeros((2, 4)), np.zeros((2, 4)))
