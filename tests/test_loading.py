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
    monkeypatch.setattr(loading, "load_exported", lambda path: ("module", os.fspath(path)))
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
