"""Location rows built from the position embedding's sin/cos table (`loc_table_dim`): imported
weights keep their parity with transformers, and a location token starts out like its voxel."""

import os

import jax
import numpy as np
import pytest

from llm3d_jax import loading
from llm3d_jax.model import llm3d, location_rows
from llm3d_jax.model.posembed import position_embedding_3d

INPUTS = (
    "features",
    "voxels",
    "point_mask",
    "prompt_ids",
    "prompt_mask",
    "answer_ids",
    "answer_mask",
)
TEXT_VOCAB = 160  # of the golden BLIP-2's T5

pytestmark = pytest.mark.usefixtures("float32_matmuls")


def _with_table_rows(module, params, table_dim: int):
    """The same model with `loc_table_dim` location rows, freshly initialised; the rest kept."""
    config = llm3d.with_overrides(module.config, loc_table_dim=table_dim)
    table_module = llm3d.LLM3D(config)
    fresh = llm3d.init_params(table_module, seed=1)
    llm = dict(params["llm"])
    for key in ("loc_embed", "loc_head"):
        if key in fresh["llm"]:
            llm[key] = fresh["llm"][key]
    return table_module, {**params, "llm": llm}


@pytest.mark.parametrize("golden", ["t5", "opt"])
def test_table_rows_keep_parity_of_imported_weights(goldens_dir, golden):
    """BLIP-2 FlanT5 / OPT goldens: the base-vocabulary logits are the PyTorch ones with table
    location rows too (they only add columns)."""
    if golden == "t5":
        path = os.path.join(goldens_dir, "llm3d", "blip2_tiny")
        io = dict(np.load(os.path.join(goldens_dir, "llm3d", "blip2_tiny_io.npz")))
    else:
        path = os.path.join(goldens_dir, "decoder", "blip2_opt")
        io = dict(np.load(os.path.join(goldens_dir, "decoder", "blip2_opt_io.npz")))
    module, params = loading.load_llm3d(path, loc_bins=64)
    module, params = _with_table_rows(module, params, 12)
    assert params["llm"]["loc_embed"].shape[0] == 12
    vocab = module.config.llm.loc_offset
    logits = jax.jit(lambda p, x: module.apply({"params": p}, **x))(
        params, {k: io[k] for k in INPUTS}
    )
    logits = np.asarray(logits)
    assert logits.shape[-1] == vocab + 64
    valid = io["answer_mask"].astype(bool)
    reference = io["logits"][..., :vocab]
    if golden == "t5":
        assert vocab == TEXT_VOCAB
    np.testing.assert_allclose(logits[..., :vocab][valid], reference[valid], atol=1e-4, rtol=0)


def test_table_rows_follow_the_voxel_grid():
    """Row i is linear in the sin/cos row of bin i's centre voxel: nearby bins have nearby rows,
    and an identity projection gives back the position embedding of that voxel on one axis."""
    table = np.asarray(location_rows.bin_table(256, 21))
    voxel = np.zeros((256, 3), np.int32)
    voxel[:, 0] = np.arange(256)
    np.testing.assert_allclose(table, np.asarray(position_embedding_3d(voxel, 63))[:, :21])
    rows, head = location_rows.rows_from_table(np.eye(21), np.eye(21), 256, 21)
    np.testing.assert_allclose(np.asarray(rows), table)
    np.testing.assert_allclose(np.asarray(head), table.T)
    near = np.linalg.norm(table[100] - table[101])
    far = np.linalg.norm(table[100] - table[160])
    assert near < far / 3
    # 64 bins: each bin reads the voxel at its centre (4 voxels a bin)
    np.testing.assert_allclose(np.asarray(location_rows.bin_table(64, 21))[10], table[42])


def test_a_pretrained_model_grows_point_tokens_and_table_rows():
    """grow_params: the params a model without point tokens / table rows had keep their values,
    the new ones (point_proj, the table-shaped location rows) come from a random init."""
    small = llm3d.LLM3D(llm3d.LLM3DConfig.tiny())
    params = llm3d.init_params(small, seed=0)
    grown = llm3d.LLM3D(llm3d.with_overrides(small.config, point_tokens=4, loc_table_dim=12))
    new_params, new = llm3d.grow_params(grown, params, seed=1)
    assert set(new) == {"point_proj/kernel", "point_proj/bias", "llm/loc_embed", "llm/loc_head"}
    np.testing.assert_array_equal(new_params["proj"]["kernel"], params["proj"]["kernel"])
    assert new_params["llm"]["loc_embed"].shape == (12, small.config.llm.d_model)
    inputs = llm3d.example_inputs(grown.config, points=8)
    logits = grown.apply({"params": new_params}, **inputs)
    assert np.isfinite(np.asarray(logits)).all()
