import math

import numpy as np
import pytest

from llm3d_jax.evaluate.navigation import navigation_metrics


def test_hand_computed_goal_errors():
    gt = [np.array([[0, 0, 0], [1, 0, 0]]), np.array([[2, 2, 0]]), np.array([[5, 5, 0]])]
    pred = [np.array([[1.3, 0.4, 0]]), np.array([[9, 9, 9], [2, 2.6, 0]]), None]
    m = navigation_metrics(pred, gt, radius=0.5)
    # errors: 0.5 (succeeds, on the radius), 0.6 (fails), missing (fails)
    assert m["Success@0.5m"] == pytest.approx(100 / 3)
    assert m["goal_error_m"] == pytest.approx((0.5 + 0.6) / 2)


def test_no_paths_and_length_mismatch():
    m = navigation_metrics([None], [np.zeros((1, 3))])
    assert m["Success@0.5m"] == 0.0 and math.isnan(m["goal_error_m"])
    with pytest.raises(ValueError, match="1 predicted paths for 2"):
        navigation_metrics([None], [np.zeros((1, 3))] * 2)
