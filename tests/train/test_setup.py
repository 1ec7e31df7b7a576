"""llm3d_jax.train.setup: the experiment configs' own train steps compile on 8 simulated CPU
devices from abstract weights (no files), the way experiments/train.py builds them."""

import importlib.util
import os

import jax
import pytest

from llm3d_jax.fileio import InputError
from llm3d_jax.model.decoder import DecoderConfig
from llm3d_jax.train import metrics, setup, sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(name):
    path = os.path.join(REPO, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scanqa_llama"])
def test_config_compiles_its_train_step_on_8_devices_without_weights(name):
    config = _config(name)
    config.data_source = "synthetic"  # shapes only: no tokenizer, no TFDS folder, no weights
    module, params = setup.build_model(config)
    assert params is None and isinstance(module.config.llm, DecoderConfig)
    assert module.config.llm.hidden_size == 3072 and module.config.llm.scan_layers
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
    assert mesh.shape["fsdp"] == 8
    training = setup.build_training(config, mesh, module)
    batch = setup.abstract_batch(config, module.config, mesh)
    compiled = setup.compile_train_step(config, mesh, training, batch)
    memory = compiled.memory_analysis()
    # Frozen bf16-compute Llama-3.2-3B in float32, sharded 8 ways: ~1.6 GB of arguments each.
    assert memory.argument_size_in_bytes < 3e9
    flops = config.batch_size * metrics.llm3d_flops(
        module.config.qformer, module.config.llm, 5000, 64, 40
    )
    # ~6 x 2.8B non-embedding LLM params x 64 examples x 137 slots (32 queries, 64 + 40 tokens)
    assert 1e14 < flops < 3e14


def test_preset_names_a_constructor_and_its_argument():
    assert setup.preset_config("tiny_decoder:qwen2").llm.qkv_bias
    assert setup.preset_config("tiny_decoder:mistral").llm.layer_windows == (8, 8)
    with pytest.raises(InputError, match="no preset 'nope'"):
        setup.preset_config("nope")
    with pytest.raises(InputError, match="unknown model type 'gpt2'"):
        setup.preset_config("tiny_decoder:gpt2")


def test_demo_config_keeps_a_pretrained_models_grounding_settings_unless_set(tmp_path):
    """demo.py leaves the grounding knobs unset: a pretrained model keeps its target tokens (as
    assets/demo has them); a knob that is set changes the model, which grows what it lacks."""
    from llm3d_jax.infer.exported import export
    from llm3d_jax.model import llm3d

    grounded = llm3d.LLM3D(llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1))
    export(
        str(tmp_path / "model"),
        grounded,
        llm3d.init_params(grounded),
        params_format="safetensors",
    )
    config = _config("demo")
    config.data_source = "synthetic"
    config.model.pretrained = str(tmp_path / "model")
    module, params = setup.build_model(config)
    assert (module.config.target_tokens, module.config.target_layers) == (4, 1)
    assert "relevance" in params and "extent_slots" in params
    # the box threshold: the model's own unless set (it needs no params)
    assert module.config.target_threshold == grounded.config.target_threshold
    config.model.target_threshold = -2.5
    module, _ = setup.build_model(config)
    assert module.config.target_threshold == -2.5
    config.model.target_threshold = None

    config.model.target_tokens = 8
    module, params = setup.build_model(config)
    assert module.config.target_tokens == 8 and "relevance" in params
    config.model.target_tokens = 0
    module, params = setup.build_model(config)
    assert module.config.target_tokens == 0 and "relevance" not in params

    fresh = _config("demo")
    fresh.data_source = "synthetic"
    module, _ = setup.build_model(fresh)
    assert module.config.target_tokens == 0  # the preset's: none


def test_reinit_starts_the_matching_params_afresh_and_keeps_the_rest(tmp_path):
    """config.model.reinit (tools/pretrain_demo's phase (d): the role geometry): the matching
    params are a new random init, every other param is the pretrained model's."""
    import numpy as np

    from llm3d_jax.infer.exported import export
    from llm3d_jax.model import llm3d

    roles = llm3d.LLM3D(llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1, object_roles=3))
    saved = llm3d.init_params(roles, seed=3)
    export(str(tmp_path / "model"), roles, saved, params_format="safetensors")
    config = _config("demo")
    config.data_source = "synthetic"
    config.model.pretrained = str(tmp_path / "model")
    config.model.reinit = ("role_geometry/.*",)
    _, params = setup.build_model(config)
    fresh = params["role_geometry"]["pair_0"]["kernel"]
    assert fresh.shape == saved["role_geometry"]["pair_0"]["kernel"].shape
    assert not np.allclose(fresh, saved["role_geometry"]["pair_0"]["kernel"])
    np.testing.assert_array_equal(
        params["relevance"]["match"]["kernel"], saved["relevance"]["match"]["kernel"]
    )
    config.model.pretrained = ""
    with pytest.raises(InputError, match="reinit: only with an exported model"):
        setup.build_model(config)
