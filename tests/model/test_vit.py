"""ViT parity with transformers' PyTorch towers through committed goldens (tools/make_goldens_vit.py)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from llm3d_jax import loading
from llm3d_jax.fileio import InputError
from llm3d_jax.model import vit


@pytest.fixture(scope="module")
def outputs(goldens_dir):
    with np.load(os.path.join(goldens_dir, "vit", "outputs.npz"), allow_pickle=False) as f:
        return dict(f)


@pytest.mark.parametrize(
    "name,layout",
    [
        ("blip2_vision", "blip2"),
        ("clip_vision", "clip"),
        ("blip2_full", "blip2"),
        ("clip_full", "clip"),
    ],
)
def test_parity_with_transformers(goldens_dir, outputs, name, layout):
    module, params = loading.load_vit(os.path.join(goldens_dir, "vit", name))
    assert module.config.layout == layout
    hidden = jax.jit(module.apply)({"params": params}, outputs["pixel_values"])
    want = outputs[name]
    assert hidden.shape == want.shape == (2, 17, 32)
    np.testing.assert_allclose(np.asarray(hidden), want, atol=1e-4, rtol=1e-4)


def test_kind_mismatch_is_a_clear_error(goldens_dir, tmp_path):
    clip_dir = os.path.join(goldens_dir, "vit", "clip_vision")
    with pytest.raises(InputError, match="expected a blip2 checkpoint"):
        loading.load_vit(clip_dir, kind="blip2")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(InputError, match="not a CLIP vision checkpoint.*'bert'"):
        loading.load_vit(bert, kind="clip")
    with pytest.raises(InputError, match="missing config.json"):
        loading.load_vit(tmp_path)


def test_truncated_checkpoint_names_missing_weights(goldens_dir, tmp_path):
    src = os.path.join(goldens_dir, "vit", "blip2_vision")
    dst = tmp_path / "blip2"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="missing weights.*layers_2"):
        loading.load_vit(dst)


def test_random_vit_shapes_and_logical_names():
    module, params = vit.random_vit(hidden_size=16)
    cfg = module.config
    x = np.zeros((3, cfg.image_size, cfg.image_size, 3), np.float32)
    out = module.apply({"params": params}, x)
    assert out.shape == (3, cfg.num_tokens, 16)
    assert np.isfinite(np.asarray(out)).all()
    boxed = vit.ViT(cfg).init(jax.random.key(0), x)["params"]
    assert boxed["layers_0"]["fc1"]["kernel"].names == ("embed", "mlp")
    with pytest.raises(ValueError, match="expects 32x32"):
        module.apply({"params": params}, np.zeros((1, 16, 16, 3), np.float32))
