"""tools/oracle_grounding.py: the oracle features name each point's object exactly."""

import json

import numpy as np

from tools import oracle_grounding as og


def test_oracle_rooms_one_hot_per_point_and_boxes_on_the_grid(tmp_path):
    og.make_data(2, 1000, str(tmp_path / "train"))
    data = dict(np.load(tmp_path / "train.npz"))
    assert data["features"].shape == (2, og.STORED, og.WIDTH)
    kinds = data["features"][..., : len(og.CATEGORIES) + 2]
    colours = data["features"][..., len(og.CATEGORIES) + 2 :]
    np.testing.assert_array_equal(kinds.sum(-1), 1)  # one category (or floor / wall) per point
    np.testing.assert_array_equal(colours.sum(-1), data["instance"] >= 0)  # objects: a colour
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert records
    for r in records:
        box = np.asarray(r["box"])
        assert (box[:3] <= box[3:]).all() and box.min() >= 0 and box.max() <= 255
        # the named object's points lie inside its box (voxel units; float32 vs float64 floor: 1)
        inside = data["voxels"][r["room"]][np.isin(data["instance"][r["room"]], r["ids"])]
        inside = inside.astype(int)
        assert len(inside) and (inside >= box[:3] - 1).all() and (inside <= box[3:] + 1).all()
