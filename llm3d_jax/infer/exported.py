"""Exported model directories (`tools/export.py`): write and load a self-contained 3D-LLM.

Layout of MODEL/:
    llm3d_config.json   {"format": "llm3d_jax.exported", "version": 1,
                         "model": LLM3DConfig.to_dict(), "params_dtype": "float32"|"bfloat16",
                         "params_format": "orbax"|"safetensors",
                         "inference": {num_points, prompt_len, answer_len, eos_id, pad_id,
                                       prompt_templates, profile},
                         "source": {...where the weights came from...}}
    params/             orbax StandardCheckpointer tree (params_format "orbax"), or
    model.safetensors   one tensor per "/"-joined param path (params_format "safetensors")
    tokenizer files     HF tokenizer that already holds <loc0>..<loc{B-1}> at ids
                        loc_offset..loc_offset+B-1 (when the model was trained with one)

This module writes the layout; `llm3d_jax.loading` reads it (`load_llm3d(dir)` or
`load_exported_bundle(dir)`, which also returns the tokenizer and the parsed config file).
float32 exports reload bit-identical; bfloat16 exports hold bfloat16 params and compute in
bfloat16.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import traverse_util

from llm3d_jax import loading
from llm3d_jax.fileio import InputError, write_text_atomic
from llm3d_jax.model import llm3d

PARAMS_DTYPES = loading.EXPORTED_PARAMS_DTYPES


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def export(
    out_dir: str,
    module,
    params,
    *,
    tokenizer=None,
    inference: dict | None = None,
    source: dict | None = None,
    params_dtype: str = "float32",
    params_format: str = "orbax",
) -> None:
    """Writes MODEL/ (module doc) into a temp folder beside `out_dir`, then renames it into place.

    `out_dir` must not exist yet or be an earlier export (it is replaced as a whole).
    """
    if params_dtype not in PARAMS_DTYPES:
        raise ValueError(f"params_dtype must be one of {PARAMS_DTYPES}, got {params_dtype!r}")
    if params_format not in loading.EXPORTED_PARAMS_FORMATS:
        raise ValueError(
            f"params_format must be one of {loading.EXPORTED_PARAMS_FORMATS}, got {params_format!r}"
        )
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.exists(os.path.join(out_dir, llm3d.EXPORTED_CONFIG)):
        raise InputError(out_dir, "exists and is not an exported model; refusing to replace it")
    config = module.config
    if params_dtype == "bfloat16":
        config = llm3d.with_overrides(config, dtype="bfloat16")
    dtype = jax.numpy.bfloat16 if params_dtype == "bfloat16" else np.float32
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)).astype(dtype), params)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".")
    try:
        if params_format == "safetensors":
            from safetensors.numpy import save_file

            save_file(
                _flat(params),
                os.path.join(tmp, loading.EXPORTED_SAFETENSORS),
                metadata={"format": loading.EXPORTED_FORMAT},
            )
        else:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(os.path.join(tmp, loading.EXPORTED_PARAMS_DIR), params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        description = {
            "format": loading.EXPORTED_FORMAT,
            "version": loading.EXPORTED_VERSION,
            "model": config.to_dict(),
            "params_dtype": params_dtype,
            "params_format": params_format,
            "inference": dict(inference or {}),
            "source": dict(source or {}),
        }
        # Written last: a folder without it is never taken for a complete export.
        write_text_atomic(
            os.path.join(tmp, llm3d.EXPORTED_CONFIG), json.dumps(description, indent=2) + "\n"
        )
        if os.path.exists(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
