import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from llm3d_jax.convert.hf import apply_rules, read_hf_dir, transpose
from llm3d_jax.fileio import InputError

RULES = [
    (r"enc\.layer\.(\d+)\.dense\.weight", r"layer_\1/dense/kernel", transpose),
    (r"enc\.layer\.(\d+)\.dense\.bias", r"layer_\1/dense/bias", None),
    (r"text_branch\..*", None, None),
]


def _target():
    return {
        f"layer_{i}": {
            "dense": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}
        }
        for i in range(2)
    }


def _tensors():
    rng = np.random.default_rng(0)
    t = {}
    for i in range(2):
        t[f"enc.layer.{i}.dense.weight"] = rng.normal(size=(2, 3)).astype(np.float32)
        t[f"enc.layer.{i}.dense.bias"] = rng.normal(size=(2,)).astype(np.float32)
    t["text_branch.w"] = np.ones(4, np.float32)
    return t


def test_rules_map_and_transpose():
    t = _tensors()
    out = apply_rules(t, RULES, _target())
    np.testing.assert_array_equal(
        out["layer_1"]["dense"]["kernel"], t["enc.layer.1.dense.weight"].T
    )
    np.testing.assert_array_equal(out["layer_0"]["dense"]["bias"], t["enc.layer.0.dense.bias"])


def test_shape_mismatch_names_key_and_shapes():
    t = _tensors()
    t["enc.layer.0.dense.weight"] = np.zeros((5, 3), np.float32)
    with pytest.raises(InputError, match=r"enc\.layer\.0\.dense\.weight.*\(5, 3\).*\(3, 2\)"):
        apply_rules(t, RULES, _target())


def test_unknown_and_missing_keys():
    t = _tensors()
    t["mystery"] = np.zeros(1, np.float32)
    with pytest.raises(InputError, match="unexpected key mystery"):
        apply_rules(t, RULES, _target())
    t = _tensors()
    del t["enc.layer.1.dense.bias"]
    with pytest.raises(InputError, match="missing weights"):
        apply_rules(t, RULES, _target())
    out = apply_rules(t, RULES, _target(), allow_missing=[r"layer_1/dense/bias"])
    assert out["layer_1"]["dense"]["bias"].shape == (2,)


def test_read_hf_dir_sharded_and_errors(tmp_path):
    with pytest.raises(InputError, match="checkpoint directory not found"):
        read_hf_dir(tmp_path / "nope")
    with pytest.raises(InputError, match="missing config.json"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        read_hf_dir(tmp_path)
    save_file({"a": np.ones(2, np.float16)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": np.arange(3, dtype=np.int64)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})
    )
    config, tensors = read_hf_dir(tmp_path)
    assert config["model_type"] == "x"
    assert tensors["a"].dtype == np.float32 and tensors["b"].dtype == np.int64
    _, only_a = read_hf_dir(tmp_path, keep=r"a$")
    assert list(only_a) == ["a"]
