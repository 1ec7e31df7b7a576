"""The demo encoder's pretraining: crops of other rooms, read-outs that learn, a loadable ViT."""

import dataclasses
import json

import numpy as np
import pytest

from data_pipeline import features
from llm3d_jax import loading
from llm3d_jax.fileio import InputError
from llm3d_jax.model import vit
from tools import train_encoder


def test_trained_vit_round_trips_and_bad_directories_are_one_line_errors(tmp_path):
    module, params = vit.random_vit(hidden_size=16, seed=3)
    loading.save_trained_vit(tmp_path / "enc", module.config, params)
    loaded, loaded_params = features.load_encoder(f"vit:{tmp_path / 'enc'}")
    assert loaded.config == module.config
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        module.apply({"params": params}, images), loaded.apply({"params": loaded_params}, images)
    )
    with pytest.raises(InputError, match="config.json: file not found"):
        loading.load_trained_vit(tmp_path / "missing")
    other, other_params = vit.random_vit(hidden_size=32)
    loading.save_trained_vit(
        tmp_path / "bad", module.config, other_params
    )  # weights of another width
    with pytest.raises(InputError, match="model.safetensors: .* has shape"):
        loading.load_trained_vit(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="unreadable safetensors") as err:
        loading.load_trained_vit(tmp_path / "bad")
    assert "\n" not in str(err.value)


def test_crops_are_labelled_and_the_read_outs_learn(tmp_path):
    config = vit.ViTConfig.tiny(16)
    crops, category, colour, room = train_encoder.object_crops(3, seed=7, views=4, config=config)
    assert crops.shape[1:] == (32, 32, 3) and crops.dtype == np.uint8
    # Masked crops: pixels outside the object are the encoder's mean colour, in every crop.
    mean = np.round(255 * np.asarray(config.image_mean)).astype(np.uint8)
    assert (crops == mean).all(axis=-1).any(axis=(1, 2)).mean() > 0.5
    assert len(crops) == len(category) == len(colour) == len(room)
    structure = category == train_encoder.STRUCTURE
    assert structure.any() and (colour[structure] == -1).all()  # walls / floor: no colour label
    assert (colour[~structure] >= 0).all() and set(room.tolist()) == {0, 1, 2}
    module = vit.ViT(config)
    before = train_encoder.train(crops, category, colour, config, steps=1, seed=0)
    after = train_encoder.train(crops, category, colour, config, steps=150, seed=0)
    first = train_encoder.accuracy(module, before, crops, category, colour)
    fitted = train_encoder.accuracy(module, after, crops, category, colour)
    assert fitted["category"] > max(first["category"], fitted["category_majority"]) + 20
    assert fitted["colour"] > first["colour"] + 20


def test_main_writes_an_encoder_the_feature_pipeline_loads(tmp_path):
    out = tmp_path / "encoder"
    assert (
        train_encoder.main(
            ["--out", str(out), "--scenes", "2", "--steps", "2", "--width", "16", "--layers", "3"]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"train", "held_out", "seconds"} and report["held_out"]["crops"] > 0
    module, _ = features.load_encoder(f"vit:{out}")
    tiny = vit.ViTConfig.tiny(16)
    assert module.config == dataclasses.replace(tiny, num_layers=3, intermediate_size=64)
