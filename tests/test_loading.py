"""llm3d_jax.loading picks the reader for each kind of path (the readers' parity is tested with
the models, in tests/model/ and tests/convert/)."""

import os

import numpy as np
import pytest

from llm3d_jax import loading
from llm3d_jax.fileio import InputError
from llm3d_jax.model import llm3d

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")


def test_exported_directories_go_to_the_exported_reader(tmp_path, monkeypatch):
    (tmp_path / llm3d.EXPORTED_CONFIG).write_text("{}")
    monkeypatch.setattr(
        loading, "load_exported", lambda path, reinit=(): ("module", os.fspath(path))
    )
    assert loading.load_llm3d(tmp_path) == ("module", os.fspath(tmp_path))


def test_a_lavis_checkpoint_is_read_over_its_base():
    path = os.path.join(GOLDENS, "lavis", "lavis_tiny.pth")
    base = os.path.join(GOLDENS, "qformer", "blip2_tiny")
    with pytest.raises(InputError, match="needs its BLIP-2 base directory"):
        loading.load_llm3d(path)
    module, params = loading.load_llm3d(path, lavis_base=base)
    assert module.config.llm.activation == "gelu"  # LAVIS's exact GELU, not FlanT5's
    saved = np.load(os.path.join(GOLDENS, "lavis", "lavis_tiny.npz"))
    np.testing.assert_array_equal(params["qformer"]["query_tokens"], saved["query_tokens"])


def test_a_run_directory_is_pointed_to_its_restorer(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(InputError, match="llm3d_jax.infer.restore.load_run"):
        loading.load_llm3d(tmp_path)


def test_reinit_leaves_out_matching_params_whatever_the_file_holds_for_them(tmp_path):
    """An export whose role geometry has other shapes than the code's (an older RoleGeometry)
    loads with reinit=("role_geometry/.*",): those params are left out, the rest read as saved;
    grow_params then starts them afresh. Without reinit the mismatch is a clear error."""
    from safetensors.numpy import load_file, save_file

    from llm3d_jax.infer import exported

    config = llm3d.LLM3DConfig.tiny(target_tokens=4, target_layers=1, object_roles=3)
    module = llm3d.LLM3D(config)
    params = llm3d.init_params(module, seed=0)
    exported.export(str(tmp_path / "m"), module, params, params_format="safetensors")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    old = "role_geometry/pairs_0/kernel"
    tensors[old] = np.zeros((tensors[old].shape[0] - 6, tensors[old].shape[1]), np.float32)
    del tensors["role_geometry/role_embed"]
    save_file(tensors, weights)
    with pytest.raises(InputError, match="params do not match"):
        loading.load_llm3d(tmp_path / "m")
    module2, loaded = loading.load_llm3d(tmp_path / "m", reinit=("role_geometry/.*",))
    assert "role_geometry" not in loaded
    np.testing.assert_array_equal(
        loaded["relevance"]["match"]["kernel"], params["relevance"]["match"]["kernel"]
    )
    grown, new = llm3d.grow_params(module2, loaded, seed=1)
    assert new and all(p.startswith("role_geometry/") for p in new)
    assert grown["role_geometry"]["pairs_0"]["kernel"].shape == (
        params["role_geometry"]["pairs_0"]["kernel"].shape
    )
    with pytest.raises(InputError, match="only for an exported model"):
        loading.load_llm3d(tmp_path / "none", reinit=("role_geometry/.*",))
