"""Exported model directories (`tools/export.py`): write and load a self-contained 3D-LLM.

Layout of MODEL/:
    llm3d_config.json   {"format": "llm3d_jax.exported", "version": 1,
                         "model": LLM3DConfig.to_dict(), "params_dtype": "float32"|"bfloat16",
                         "params_format": "orbax"|"safetensors",
                         "inference": {num_points, prompt_len, answer_len, eos_id, pad_id},
                         "source": {...where the weights came from...}}
    params/             orbax StandardCheckpointer tree (params_format "orbax"), or
    model.safetensors   one tensor per "/"-joined param path (params_format "safetensors")
    tokenizer files     HF tokenizer that already holds <loc0>..<loc{B-1}> at ids
                        loc_offset..loc_offset+B-1 (when the model was trained with one)

`load_exported(dir) -> (module, params)` is what `llm3d.from_pretrained` delegates to;
`load_exported_bundle(dir)` also returns the tokenizer (or None) and the parsed config file.
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

from llm3d_jax.fileio import InputError, write_text_atomic

FORMAT = "llm3d_jax.exported"
VERSION = 1
CONFIG_FILE = "llm3d_config.json"  # == llm3d.EXPORTED_CONFIG
PARAMS_DIR = "params"
SAFETENSORS_FILE = "model.safetensors"
PARAMS_FORMATS = ("orbax", "safetensors")
PARAMS_DTYPES = ("float32", "bfloat16")


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
    from llm3d_jax.model import llm3d

    if params_dtype not in PARAMS_DTYPES:
        raise ValueError(f"params_dtype must be one of {PARAMS_DTYPES}, got {params_dtype!r}")
    if params_format not in PARAMS_FORMATS:
        raise ValueError(f"params_format must be one of {PARAMS_FORMATS}, got {params_format!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.exists(os.path.join(out_dir, CONFIG_FILE)):
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
                _flat(params), os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": FORMAT}
            )
        else:
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        description = {
            "format": FORMAT,
            "version": VERSION,
            "model": config.to_dict(),
            "params_dtype": params_dtype,
            "params_format": params_format,
            "inference": dict(inference or {}),
            "source": dict(source or {}),
        }
        # Written last: a folder without it is never taken for a complete export.
        write_text_atomic(os.path.join(tmp, CONFIG_FILE), json.dumps(description, indent=2) + "\n")
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


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise InputError(model_dir, f"not an exported model directory (no {CONFIG_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise InputError(path, f"not a {FORMAT} config")
    if description.get("version") != VERSION:
        raise InputError(
            path, f"format version {description.get('version')} (this code reads {VERSION})"
        )
    if description.get("params_format") not in PARAMS_FORMATS:
        raise InputError(path, f"unknown params_format {description.get('params_format')!r}")
    if description.get("params_dtype", "float32") not in PARAMS_DTYPES:
        raise InputError(path, f"unknown params_dtype {description.get('params_dtype')!r}")
    check_inference(path, description.get("inference", {}))
    model = description.get("model")
    if not isinstance(model, dict):
        raise InputError(path, "model: expected an object (LLM3DConfig.to_dict())")
    check_model_config(path, model)
    return description


# Integer settings that must be at least 1 (sizes, counts); other integers (ids, offsets,
# loc_bins, OPT's embed_dim) may be 0. Every integer is capped: a config from a stranger must
# not make tracing the model take hours or its abstract params exabytes.
_POSITIVE_INTS = (
    "size",
    "layers",
    "heads",
    "d_model",
    "d_kv",
    "d_ff",
    "head_dim",
    "num_query_tokens",
    "num_buckets",
    "max_distance",
    "max_position_embeddings",
    "cross_attention_frequency",
    "feature_dim",
    "num_points",
)
_MAX_INT = 1 << 22
_MAX_LAYERS = 1024
INFERENCE_INTS = {"num_points": 1, "prompt_len": 1, "answer_len": 1, "eos_id": 0, "pad_id": 0}


def _check_int(path: str, name: str, value, minimum: int, maximum: int = _MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(path, f"{name}: expected an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise InputError(path, f"{name}: {value} is outside [{minimum}, {maximum}]")


def check_model_config(path: str, model: dict, prefix: str = "model") -> None:
    """Types and ranges of `llm3d_config.json`'s model dict against the config dataclasses'
    fields (their defaults give the type), before any of it reaches a constructor."""
    import dataclasses

    from llm3d_jax.model import llm3d
    from llm3d_jax.model.decoder import DecoderConfig
    from llm3d_jax.model.qformer import QFormerConfig
    from llm3d_jax.model.t5 import T5Config

    def check(cls, values: dict, where: str) -> None:
        for field in dataclasses.fields(cls):
            if field.name not in values or field.name in ("qformer", "llm"):
                continue
            name, value = f"{where}.{field.name}", values[field.name]
            default = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()
            )
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise InputError(path, f"{name}: expected true or false, got {value!r}")
            elif isinstance(default, int):
                positive = any(p in field.name for p in _POSITIVE_INTS) and (
                    field.name != "embed_dim"
                )
                top = _MAX_LAYERS if "layers" in field.name else _MAX_INT
                _check_int(path, name, value, 1 if positive else 0, top)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(path, f"{name}: expected a number, got {value!r}")
                if not np.isfinite(value) or value < 0:
                    raise InputError(path, f"{name}: {value} must be a finite number >= 0")
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise InputError(path, f"{name}: expected a string, got {value!r}")
            elif isinstance(default, tuple):
                if not isinstance(value, (list, tuple)):
                    raise InputError(path, f"{name}: expected a list, got {value!r}")
                for v in value:
                    _check_int(path, name, v, 0)

    for key, cls in (("qformer", QFormerConfig), ("llm", None)):
        sub = model.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise InputError(path, f"{prefix}.{key}: expected an object, got {sub!r}")
        if cls is None:
            cls = DecoderConfig if "family" in sub else T5Config
        check(cls, sub, f"{prefix}.{key}")
    check(llm3d.LLM3DConfig, model, prefix)


def check_inference(path: str, inference) -> None:
    """The `inference` block: positive lengths, non-negative ids, templates as strings."""
    if not isinstance(inference, dict):
        raise InputError(path, f"inference: expected an object, got {inference!r}")
    for key, minimum in INFERENCE_INTS.items():
        if key in inference:
            _check_int(path, f"inference.{key}", inference[key], minimum)
    templates = inference.get("prompt_templates", {})
    if not isinstance(templates, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in templates.items()
    ):
        raise InputError(path, "inference.prompt_templates: expected {task: template string}")


def load_exported(model_dir: str):
    """-> (module, params): the `llm3d.from_pretrained` contract for exported directories."""
    module, params, _, _ = load_exported_bundle(model_dir, with_tokenizer=False)
    return module, params


def load_exported_bundle(model_dir: str, with_tokenizer: bool = True):
    """-> (module, params, tokenizer or None, config file dict)."""
    from llm3d_jax import tokens
    from llm3d_jax.model import llm3d

    # Absolute: orbax refuses relative checkpoint paths, and users type `--model demo_out/model`.
    model_dir = os.path.abspath(os.fspath(model_dir))
    tokens.refuse_remote_code(model_dir)
    description = read_config(model_dir)
    config_path = os.path.join(model_dir, CONFIG_FILE)
    try:
        module = llm3d.LLM3D(llm3d.LLM3DConfig.from_dict(dict(description["model"])))
        expected = llm3d.abstract_params(module)
    except Exception as err:  # a constructor's or the model's own shape check: a bad config
        problem = " ".join(str(err).split())[:200]
        raise InputError(
            config_path, f"bad model config ({type(err).__name__}: {problem})"
        ) from None
    params = _read_params(model_dir, description["params_format"])
    check_params(model_dir, params, expected, description.get("params_dtype", "float32"))
    tokenizer = None
    if with_tokenizer and os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        from llm3d_jax import tokens

        tokenizer = tokens.load_tokenizer(model_dir)
    return module, params, tokenizer, description


def check_params(model_dir: str, params: dict, expected: dict, params_dtype: str) -> None:
    """Params read from an export against the model's abstract params: the same paths and
    shapes, the dtype the config file names, finite values; InputError naming the export."""
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    flat = _flat(params)
    got = {k: v.shape for k, v in flat.items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:3]
        raise InputError(
            model_dir,
            f"params do not match the model config (missing {missing}, wrong shape {wrong}, "
            f"{len(set(got) - set(want))} unexpected)",
        )
    dtype = np.dtype(jax.numpy.bfloat16 if params_dtype == "bfloat16" else np.float32)
    for name, value in flat.items():
        if value.dtype != dtype:
            raise InputError(
                model_dir, f"param {name} is {value.dtype}, the config says {params_dtype}"
            )
        if not np.isfinite(value.astype(np.float32)).all():
            raise InputError(model_dir, f"param {name} holds non-finite values (NaN or Inf)")


def _read_params(model_dir: str, params_format: str) -> dict:
    model_dir = os.path.abspath(model_dir)  # orbax takes absolute paths only
    if params_format == "safetensors":
        path = os.path.join(model_dir, SAFETENSORS_FILE)
        if not os.path.exists(path):
            raise InputError(model_dir, f"incomplete export: {SAFETENSORS_FILE} missing")
        from safetensors.numpy import load_file

        try:
            flat = load_file(path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise InputError(path, f"unreadable ({type(err).__name__}: {err})") from None
        return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    path = os.path.join(model_dir, PARAMS_DIR)
    if not os.path.isdir(path):
        raise InputError(model_dir, f"incomplete export: {PARAMS_DIR}/ missing")
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
            )
            params = checkpointer.restore(path, abstract)
    except Exception as err:  # any layer (json, tensorstore, ocdbt) of a damaged folder
        raise InputError(
            path, f"unreadable params ({type(err).__name__}: {str(err)[:300]})"
        ) from None
    return jax.tree.map(np.asarray, params)
